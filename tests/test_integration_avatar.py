"""integrations/avatar.py without a framework: every segment a caller ends is ended in the
session too, so a long conversation never runs into the session's open-segment limit."""

import asyncio

import numpy as np
import pytest

from integrations.avatar import AvatarHost
from server.avatars import avatar_image

pytestmark = pytest.mark.timeout(120)


def test_ended_segments_do_not_count_against_the_open_segment_limit():
    async def run():
        host = AvatarHost.load("tiny")
        avatar = await host.open(avatar_image("ada"), audio_rate=16000)
        try:
            limit = avatar._session.options.max_open_segments
            for i in range(limit + 4):
                avatar.push(np.full(800, 1000, np.int16), 16000, f"utterance-{i}")
                avatar.end(f"utterance-{i}")
            return limit, avatar._session.open_segments()
        finally:
            await avatar.aclose()
            host.close()

    limit, still_open = asyncio.run(run())
    assert limit == 16 and still_open == 0
