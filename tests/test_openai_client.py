"""The gateway as OpenAI's own Python client meets it (the `openai` package, as applications call vLLM):
an arm chosen by header, by alias, or left to the split is served and tagged, a streamed completion
arrives chunk by chunk with its usage, and the filter's refusals are errors the client understands
(status and `error.code` in OpenAI's error shape)."""

import openai
import pytest

SPLIT = {"onMissing": "split", "split": {"weights": {"nvlink": 1, "fs": 1}}}


@pytest.fixture
def client(stack):
    s = stack(filter_config=SPLIT)
    return lambda **headers: openai.OpenAI(base_url=f"{s.urls()['gateway']}/v1", api_key="unused", max_retries=0,
                                           timeout=10, default_headers=headers)


def chat(client, **kw):
    return client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "one two three"}], max_tokens=4, **kw)


def test_an_arm_chosen_by_header_or_alias_is_served_and_tagged(client):
    for value, arm in (("nvlink", "nvlink"), ("p2p", "nvlink"), ("FS", "fs"), ("filesystem", "fs")):
        raw = chat(client(**{"x-kv-backend": value}))
        completion = raw.parse()
        assert raw.headers["x-kv-backend"] == arm and raw.headers["x-served-by"] == arm, (value, raw.headers)
        assert completion.choices[0].message.content and completion.usage.completion_tokens == 4


def test_untagged_requests_are_split_and_tagged_with_their_arm(client):
    seen = {chat(client()).headers["x-kv-backend"] for _ in range(40)}
    assert seen == {"nvlink", "fs"}, seen


def test_a_streamed_completion_arrives_in_chunks_with_its_usage(client):
    stream = client(**{"x-kv-backend": "fs"}).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=8, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 8, chunks
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_the_filters_refusals_are_errors_the_client_understands(client):
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client(**{"x-kv-backend": "bogus"}))
    assert refused.value.status_code == 400
    assert refused.value.code == "unknown_kv_backend", refused.value.body
    assert refused.value.param == "x-kv-backend" and "nvlink (aliases: p2p, nccl)" in refused.value.message
