"""Driver: distilabel's pipeline, `LoadDataFromDicts >> TextGeneration(OpenAILLM)`.

    benchmarks/.venvs/distilabel/bin/python benchmarks/peers/distilabel_driver.py --base-url URL \
        --requests N --concurrency C --workdir DIR

Prints one JSON line: import_s, loop_s (around `pipeline.run`: the step processes, the batches, the
parquet files and the Distiset), ok, failed, version. Same prompts, model and parameters as the other
drivers. distilabel has no rate limiter and no concurrency setting of its own: `TextGeneration` sends
one batch of `input_batch_size` requests at once (asyncio.gather) and waits for the whole batch, so
`--concurrency` is the batch size. Retries are the OpenAI SDK's (distilabel's default max_retries=6).
"""
from __future__ import annotations

import argparse
import json
import time

started = time.perf_counter()
from distilabel.models.llms import OpenAILLM  # noqa: E402
from distilabel.pipeline import Pipeline  # noqa: E402
from distilabel.steps import LoadDataFromDicts  # noqa: E402
from distilabel.steps.tasks import TextGeneration  # noqa: E402

import_s = time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--import-only", action="store_true")
    args = parser.parse_args()
    if args.import_only:
        print(json.dumps({"import_s": import_s}))
        return
    rows = [{"instruction": f"question number {i}"} for i in range(args.requests)]
    start = time.perf_counter()
    with Pipeline(name="peers-bench", cache_dir=args.workdir) as pipeline:
        load = LoadDataFromDicts(data=rows, batch_size=args.concurrency)
        ask = TextGeneration(
            llm=OpenAILLM(model="gpt-4o-mini", base_url=args.base_url, api_key="sk-bench",
                          generation_kwargs={"temperature": 0.8, "max_new_tokens": 64}),
            input_batch_size=args.concurrency,
        )
        load >> ask
    distiset = pipeline.run(use_cache=False)
    loop_s = time.perf_counter() - start
    data = distiset["default"]["train"]
    ok = sum(1 for generation in data["generation"] if generation)
    from importlib.metadata import version

    print(json.dumps({"import_s": import_s, "loop_s": loop_s, "ok": ok, "failed": args.requests - ok,
                      "version": f"distilabel {version('distilabel')}"}))


if __name__ == "__main__":
    main()
