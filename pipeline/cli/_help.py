"""What ``llm-pipeline run --help`` shows besides the flags: a short usage and examples."""

from __future__ import annotations

__all__ = ["RUN_EXAMPLES", "RUN_USAGE"]

RUN_USAGE = "%(prog)s INPUT -o OUTPUT --model MODEL [--prompt TEMPLATE] [options]"

RUN_EXAMPLES = """\
examples:
  # every row of people.jsonl to gpt-4o-mini, answers in greeted.jsonl
  export OPENAI_API_KEY=sk-...
  llm-pipeline run people.jsonl -o greeted.jsonl --model gpt-4o-mini \\
      --prompt "Say hello to {name} in one sentence" --rpm 500 --tpm 200000

  # a CSV in, a compressed CSV out, a local OpenAI-compatible server (vLLM, Ollama)
  llm-pipeline run reviews.csv -o scored.csv.gz --model llama3 \\
      --base-url http://localhost:8000/v1 --prompt "Score 1-5, as JSON: {text}" --json-output

  # Anthropic, structured answers, a budget
  llm-pipeline run tickets.jsonl -o triaged.jsonl --provider anthropic \\
      --model claude-3-5-haiku --prompt "Triage as JSON: {body}" --json-output --budget 5

  # after Ctrl-C or a crash: the same command with --resume; from a job file
  llm-pipeline run people.jsonl -o greeted.jsonl --model gpt-4o-mini --resume
  llm-pipeline run --config job.toml

every flag, job files, exit statuses and the output files: docs/cli.md and docs/jobs.md
"""
