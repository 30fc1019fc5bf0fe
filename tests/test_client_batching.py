"""One Serve call per image (serving/client.py `ImageBatcher`): a stage's requests of one image that are
ready in the same event-loop turn go to the replica together, each still its own request with its own
answer, retry and deadline. The deployment handle is a stand-in (test_deadline.py's `FakeHandle` shape:
`.options(stream=True).chat_payloads.remote(list)` streams (index, answer) pairs), so no Ray or Serve runs here; the
real replica method (`llm_server.StageLLMServer.chat_payloads`) runs in the Serve tests."""

from __future__ import annotations

import asyncio

from annotate.engines.base import ChatRequest
from annotate.serving.client import ImageBatcher, ModelClient, image_key

from test_deadline import FakeHandle, app


def summary(text: str) -> dict:
    return {"text": text, "finish_reason": "stop", "prompt_tokens": 5, "completion_tokens": 3}


def echo(payloads: list[dict]) -> list[dict]:
    """A replica that answers each request with its own request id's region."""
    return [summary(p["request_id"].split("|")[0]) for p in payloads]


def request(image: str, i: int) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": "describe"}], request_id=f"00001:{image}:{i}")


async def _all(client, requests):
    return await asyncio.gather(*(client.chat(r) for r in requests))


def test_an_images_requests_of_one_turn_go_in_one_call_and_each_gets_its_own_answer():
    handle = FakeHandle(chat_payloads=[(echo, 0.01), (echo, 0.01)])
    client = ModelClient(app("llm"), reasoning=False, max_in_flight=8, deadline_s=5, handle=handle)
    requests = [request("a", 0), request("b", 0), request("a", 1), request("a", 2), request("b", 1)]
    results = asyncio.run(_all(client, requests))
    assert [r.text for r in results] == [r.request_id for r in requests]  # in order, each its own
    assert all(r.ok for r in results)
    assert len(handle.chat_payloads.sent) == client.batcher.calls == 2  # one call per image, not five
    sent_ids = [[p["request_id"].split("|")[0] for p in call.payloads] for call in handle.chat_payloads.sent]
    assert sorted(map(len, sent_ids)) == [2, 3] and all(len({image_key({"request_id": i}) for i in ids}) == 1
                                                        for ids in sent_ids)


def test_a_request_that_fails_on_the_replica_fails_alone():
    def one_fails(payloads):
        answers = echo(payloads)
        answers[1] = {"exception": "ValueError: bad image"}
        return answers

    handle = FakeHandle(chat_payloads=[(one_fails, 0.0)])
    client = ModelClient(app("llm"), reasoning=False, max_in_flight=8, deadline_s=5, handle=handle)
    results = asyncio.run(_all(client, [request("a", i) for i in range(3)]))
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error_kind == "internal" and "ValueError: bad image" in results[1].error


def test_a_dead_engine_in_a_batch_sends_its_requests_again():
    """The replica's engine died under the call: each request is sent again (not an attempt spent), and
    answered once."""
    dead = lambda payloads: [{"exception": "EngineDeadError: EngineCore encountered an issue"}] * len(payloads)  # noqa: E731
    handle = FakeHandle(chat_payloads=[(dead, 0.0), (echo, 0.0)])
    client = ModelClient(app("llm"), reasoning=False, max_in_flight=8, deadline_s=5, handle=handle)
    results = asyncio.run(_all(client, [request("a", i) for i in range(3)]))
    assert all(r.ok for r in results) and client.resent == 3
    assert len(handle.chat_payloads.sent) == 2  # the three resent together, in one call again


def test_a_call_past_its_deadline_times_out_each_of_its_requests_and_is_cancelled():
    handle = FakeHandle(chat_payloads=[(echo, None)])  # a hung replica
    client = ModelClient(app("llm"), reasoning=False, max_in_flight=8, deadline_s=0.1, handle=handle)
    results = asyncio.run(_all(client, [request("a", i) for i in range(3)]))
    assert [r.error_kind for r in results] == ["timeout"] * 3 and all(r.retryable for r in results)
    assert len(handle.chat_payloads.sent) == 1 and handle.chat_payloads.sent[0].cancelled


class Stream:
    """A Serve streaming response: (index, answer) pairs, each after its own delay; `cancel()` recorded."""

    def __init__(self, pairs: list[tuple[float, int, dict]]):
        self.pairs, self.cancelled = pairs, False

    async def __aiter__(self):
        for delay, index, answer in self.pairs:
            await asyncio.sleep(delay)
            yield index, answer

    def cancel(self):
        self.cancelled = True


def test_each_answer_is_handed_over_when_it_arrives_not_when_the_call_ends():
    """A short answer frees its place in the model's in-flight share at once, not after the image's
    longest answer: the engine keeps getting requests (BENCHMARKS.md 7a)."""
    finished: list[tuple[str, float]] = []

    async def run():
        batcher = ImageBatcher(lambda payloads: Stream([(0.0, 1, summary("quick")), (0.3, 0, summary("slow"))]))
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def ask(i):
            answer = await batcher.submit({"request_id": f"s:a:{i}|n"})
            finished.append((answer["text"], loop.time() - start))
        await asyncio.gather(ask(0), ask(1))
        return batcher.calls

    assert asyncio.run(run()) == 1
    assert [text for text, _ in finished] == ["quick", "slow"]
    assert finished[0][1] < 0.15 <= finished[1][1]


def test_calls_are_capped_and_a_short_stream_fails_only_the_unanswered():
    calls: list[int] = []

    def open_call(payloads):
        calls.append(len(payloads))
        answered = payloads if len(calls) < 3 else payloads[:1]  # the third call's stream ends early
        return Stream([(0.0, i, summary(p["request_id"])) for i, p in enumerate(answered)])

    async def run():
        batcher = ImageBatcher(open_call, max_per_call=4)
        first = await asyncio.gather(*(batcher.submit({"request_id": f"s:a:{i}|n"}) for i in range(6)))
        last = await asyncio.gather(*(batcher.submit({"request_id": f"s:a:{i}|n"}) for i in (7, 8)),
                                    return_exceptions=True)
        return first, last

    first, last = asyncio.run(run())
    assert calls == [4, 2, 2] and [a["text"] for a in first] == [f"s:a:{i}|n" for i in range(6)]
    assert last[0]["text"] == "s:a:7|n" and "ended before every request had one" in str(last[1])


def test_a_call_past_its_deadline_is_cancelled_and_only_the_unanswered_time_out():
    stream = Stream([(0.0, 0, summary("in time")), (3600, 1, summary("never"))])

    async def run():
        batcher = ImageBatcher(lambda payloads: stream, deadline_s=0.1)
        return await asyncio.gather(*(batcher.submit({"request_id": f"s:a:{i}|n"}) for i in range(2)),
                                    return_exceptions=True)

    answered, late = asyncio.run(run())
    assert answered["text"] == "in time" and type(late).__name__ == "DeadlinePassed" and stream.cancelled


def test_every_caller_gone_cancels_the_call():
    started = asyncio.Event()
    stream = Stream([(3600, 0, summary("never"))])

    def open_call(payloads):
        started.set()
        return stream

    async def run():
        batcher = ImageBatcher(open_call)
        waiters = [asyncio.ensure_future(batcher.submit({"request_id": f"s:a:{i}|n"})) for i in range(2)]
        await started.wait()
        await asyncio.sleep(0.01)
        for w in waiters:
            w.cancel()
        await asyncio.sleep(0.01)

    asyncio.run(run())
    assert stream.cancelled
