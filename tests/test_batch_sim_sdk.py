"""The simulator's batch endpoints as the official SDKs see them (a second opinion on the wire).

The batch client and the simulator were written together; these tests hold the simulator to
what the official ``openai`` and ``anthropic`` SDKs send and accept, so the two cannot share a
misunderstanding of the protocol.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from sim_thread import ThreadSim

from pipeline.testing import BatchSimConfig, Simulator


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with ThreadSim() as server:
        server.batches.configure(BatchSimConfig(delay_s=0.05))
        yield server


def openai_client(sim: Simulator) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.url, api_key="sk-test", max_retries=0)


def anthropic_client(sim: Simulator) -> anthropic.Anthropic:
    assert sim.base_url is not None
    return anthropic.Anthropic(base_url=sim.base_url, api_key="sk-ant-test", max_retries=0)


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def openai_requests(n: int) -> bytes:
    return jsonl(
        [
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "gpt-x", "messages": [{"role": "user", "content": f"hi {i}"}]},
            }
            for i in range(n)
        ]
    )


def upload(client: openai.OpenAI, content: bytes) -> Any:
    return client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch")


def wait(retrieve: Any, batch_id: str, done: Any) -> Any:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        batch = retrieve(batch_id)
        if done(batch):
            return batch
        time.sleep(0.02)
    raise AssertionError(f"batch {batch_id} did not end")


def test_openai_sdk_runs_a_batch_from_upload_to_results(sim: Simulator) -> None:
    client = openai_client(sim)
    uploaded = upload(client, openai_requests(5))
    assert uploaded.purpose == "batch" and uploaded.bytes > 0
    assert client.files.retrieve(uploaded.id).id == uploaded.id
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "sdk"},
    )
    assert batch.status == "validating" and batch.metadata == {"job": "sdk"}
    done = wait(client.batches.retrieve, batch.id, lambda b: b.status == "completed")
    assert done.request_counts is not None and done.request_counts.completed == 5
    assert done.output_file_id and done.error_file_id is None
    lines = client.files.content(done.output_file_id).text.splitlines()
    answers = {}
    for line in lines:
        item = json.loads(line)
        assert item["error"] is None and item["response"]["status_code"] == 200
        answers[item["custom_id"]] = item["response"]["body"]["choices"][0]["message"]["content"]
    assert answers == {f"r{i}": f"echo: hi {i}" for i in range(5)}
    listed = client.batches.list(limit=10)
    assert [b.id for b in listed.data] == [batch.id]


def test_openai_sdk_sees_per_row_errors_in_the_error_file(sim: Simulator) -> None:
    sim.batches.configure(BatchSimConfig(delay_s=0.05, row_errors=1.0, row_error_status=400))
    client = openai_client(sim)
    uploaded = upload(client, openai_requests(3))
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait(client.batches.retrieve, batch.id, lambda b: b.status == "completed")
    assert done.output_file_id is None and done.error_file_id
    for line in client.files.content(done.error_file_id).text.splitlines():
        item = json.loads(line)
        assert item["response"]["status_code"] == 400
        assert item["response"]["body"]["error"]["type"] == "invalid_request_error"


def test_openai_sdk_cancels_a_batch(sim: Simulator) -> None:
    sim.batches.configure(BatchSimConfig(delay_s=60))
    client = openai_client(sim)
    uploaded = upload(client, openai_requests(3))
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert client.batches.cancel(batch.id).status == "cancelling"
    done = wait(client.batches.retrieve, batch.id, lambda b: b.status == "cancelled")
    assert done.error_file_id is not None
    codes = {
        json.loads(line)["error"]["code"]
        for line in client.files.content(done.error_file_id).text.splitlines()
    }
    assert codes == {"batch_cancelled"}


def test_openai_sdk_gets_a_failed_batch_with_its_errors(sim: Simulator) -> None:
    client = openai_client(sim)
    bad = b'{"custom_id":"a","method":"GET","url":"/v1/chat/completions","body":{}}\n'
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(bad)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait(client.batches.retrieve, batch.id, lambda b: b.status == "failed")
    assert done.errors is not None and done.errors.data
    assert done.errors.data[0].code == "invalid_url" and done.errors.data[0].line == 1


def test_openai_sdk_gets_404_for_an_unknown_batch(sim: Simulator) -> None:
    with pytest.raises(openai.NotFoundError):
        openai_client(sim).batches.retrieve("batch_nope")


def anthropic_requests(n: int) -> list[Any]:
    return [
        {
            "custom_id": f"r{i}",
            "params": {
                "model": "claude-x",
                "max_tokens": 64,
                "messages": [{"role": "user", "content": f"hi {i}"}],
            },
        }
        for i in range(n)
    ]


def test_anthropic_sdk_runs_a_message_batch_to_its_results(sim: Simulator) -> None:
    client = anthropic_client(sim)
    batch = client.messages.batches.create(requests=anthropic_requests(5))
    assert batch.processing_status == "in_progress" and batch.results_url is None
    assert batch.request_counts.processing == 5
    done = wait(
        client.messages.batches.retrieve, batch.id, lambda b: b.processing_status == "ended"
    )
    assert done.request_counts.succeeded == 5 and done.results_url
    answers = {}
    for item in client.messages.batches.results(batch.id):
        assert item.result.type == "succeeded"
        answers[item.custom_id] = item.result.message.content[0].text  # type: ignore[union-attr]
    assert answers == {f"r{i}": f"echo: hi {i}" for i in range(5)}
    assert [b.id for b in client.messages.batches.list(limit=5).data] == [batch.id]


def test_anthropic_sdk_sees_errored_and_expired_results(sim: Simulator) -> None:
    sim.batches.configure(BatchSimConfig(delay_s=0.05, expire_batches=1, expire_done=0.5))
    client = anthropic_client(sim)
    requests = anthropic_requests(4)
    del requests[0]["params"]["max_tokens"]  # invalid: max_tokens is required
    batch = client.messages.batches.create(requests=requests)
    wait(client.messages.batches.retrieve, batch.id, lambda b: b.processing_status == "ended")
    kinds = {item.custom_id: item.result.type for item in client.messages.batches.results(batch.id)}
    assert sorted(kinds.values()).count("expired") == 2
    errored = [
        item.result
        for item in client.messages.batches.results(batch.id)
        if item.result.type == "errored"
    ]
    for result in errored:
        assert result.error.error.type == "invalid_request_error"  # type: ignore[union-attr]


def test_anthropic_sdk_cancels_a_message_batch(sim: Simulator) -> None:
    sim.batches.configure(BatchSimConfig(delay_s=60))
    client = anthropic_client(sim)
    batch = client.messages.batches.create(requests=anthropic_requests(3))
    assert client.messages.batches.cancel(batch.id).processing_status == "canceling"
    wait(client.messages.batches.retrieve, batch.id, lambda b: b.processing_status == "ended")
    assert {item.result.type for item in client.messages.batches.results(batch.id)} == {"canceled"}


def test_anthropic_sdk_is_refused_a_duplicate_custom_id(sim: Simulator) -> None:
    client = anthropic_client(sim)
    with pytest.raises(anthropic.BadRequestError, match="duplicate custom_id"):
        client.messages.batches.create(requests=anthropic_requests(2) * 2)
