"""Where a change-feed stream starts, and what a draining server answers: no I/O."""

from __future__ import annotations

from google.rpc import code_pb2, error_details_pb2

from service.errors import DOMAIN, ServerShuttingDown
from service.feed.watch import starting_cursor


def test_a_stream_without_a_token_starts_at_the_furthest_of_the_database_head_and_the_hub() -> None:
    assert starting_cursor(None, head=40, subscribed_at=38) == 40
    assert starting_cursor(None, head=40, subscribed_at=42) == 42


def test_a_token_behind_the_hub_is_replayed_from_where_it_stands() -> None:
    assert starting_cursor(17, head=40, subscribed_at=40) == 17


def test_a_token_ahead_of_this_process_hub_is_kept_not_rewound_to_the_hub() -> None:
    # Sealed by a process whose listener was further along: the changes up to 45 were sent.
    assert starting_cursor(45, head=45, subscribed_at=41) == 45


def test_a_draining_server_answers_unavailable_server_shutting_down_with_a_retry_delay() -> None:
    status = ServerShuttingDown(retry_delay=0.2).to_status()
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info) and status.details[1].Unpack(retry)
    assert status.code == code_pb2.UNAVAILABLE
    assert (info.reason, info.domain) == ("SERVER_SHUTTING_DOWN", DOMAIN)
    assert retry.retry_delay.ToMilliseconds() == 200
