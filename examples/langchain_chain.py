"""A LangChain chain enriched through the pipeline, both ways, against the simulated server.

Run: ``python examples/langchain_chain.py`` (no key, no network: the simulator answers
``echo: <prompt>`` and fails 10% of requests with a 5xx, which the pipeline retries).

1. ``RunnableStage``: an existing LCEL chain (prompt | ChatOpenAI | parser) runs on every row
   under the pipeline's rate limit, retries, token and cost accounting.
2. ``PipelineRunnable``: that pipeline dropped back into a bigger LangChain chain, which
   ``abatch``es 50 inputs through one pipeline run.
"""

from __future__ import annotations

import anyio
import httpx
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from langchain_openai import ChatOpenAI

from pipeline import Pipeline
from pipeline.testing import SimConfig, serve
from stages import PipelineRunnable, RunnableStage


async def main() -> None:
    async with (
        serve(SimConfig(latency_ms=10, error_5xx=0.1, seed=4)) as sim,
        httpx.AsyncClient() as http,  # our own HTTP client, closed at the end
    ):
        # the official SDK under ChatOpenAI retries by itself: off, so retries do not multiply
        model = ChatOpenAI(
            model="sim-1",
            base_url=sim.url,
            api_key="sk-demo",
            max_retries=0,
            http_async_client=http,
        )
        prompt = ChatPromptTemplate.from_messages([("user", "One word for {topic}")])
        chain = prompt | model | StrOutputParser()

        # 1. the chain as a stage: limits, retries and accounting from the pipeline
        stage = RunnableStage(
            chain,
            rpm=6000,
            max_retries=4,
            backoff_base=0.05,
            prices={"sim-1": (0.15, 0.60)},
            output_field="word",
        )
        topics = [{"topic": f"topic {i}"} for i in range(50)]
        report = await Pipeline(stage, ordered=True).run(topics)
        print(
            f"stage: {report.ok} ok, {report.failed} failed, {report.retries} retries, "
            f"{report.prompt_tokens + report.completion_tokens} tokens, ${report.cost_usd:.6f}"
        )

        # 2. the pipeline inside a bigger LangChain chain
        enrich = PipelineRunnable(Pipeline(RunnableStage(chain, max_retries=4, backoff_base=0.05)))
        bigger = (
            RunnableLambda(lambda text: {"topic": text.strip().lower()})
            | enrich
            | RunnableLambda(lambda row: f"{row['topic']} -> {row['response']}")
        )
        lines = await bigger.abatch([f"  Topic {i} " for i in range(50)])
        print(f"chain: {len(lines)} answers, first: {lines[0]}")


if __name__ == "__main__":
    anyio.run(main)
