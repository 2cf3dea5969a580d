"""Apprentice serve: the student at work behind an OpenAI-compatible router, with the teacher as its fallback
(`apprentice serve RECIPE.yaml`, `python -m serve RECIPE.yaml`; docs/serve.md).

Modules: config.py (the `serve:` section), backends.py (a factory teacher behind the factory's asker),
router.py (who answers, the served log, shadow comparisons), metrics.py (counters, the alarm, Prometheus text),
app.py (the HTTP API on aiohttp), commands.py (the command). The served log's format and its reader, the
factory's `prompts: {served: DIR}` source, are in factory/served_log.py.
"""
