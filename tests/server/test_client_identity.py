"""Whose partial-upload quota a ByteStream write counts against (bytestream_service.py)."""

from __future__ import annotations

from engine import transport
from engine.server.auth import ApiKeyAuth
from engine.server.bytestream_service import client_identity

KEYS = ApiKeyAuth(["key-one", "key-two"])
H = transport.API_KEY_HEADER


def test_with_keys_a_client_is_the_key_it_sent_named_by_its_place_not_its_value():
    assert client_identity("ipv4:127.0.0.1:5000", [(H, "key-two")], KEYS) == "API key #2"
    assert client_identity("ipv4:127.0.0.1:5001", [("authorization", "Bearer key-one")],
                           KEYS) == "API key #1"
    # Two machines with one key share it; one machine with two keys has two quotas.
    assert client_identity("ipv4:10.0.0.9:4000", [(H, "key-one")], KEYS) == "API key #1"
    assert "key-one" not in client_identity("ipv4:10.0.0.9:4000", [(H, "key-one")], KEYS)


def test_without_a_key_a_client_is_its_address_whatever_its_port():
    for keys in (None, KEYS):  # KEYS: a call without a key (the interceptor refuses it)
        assert client_identity("ipv4:10.1.2.3:40000", [], keys) == "ipv4:10.1.2.3"
        assert client_identity("ipv4:127.0.0.1:40001", [], keys) == "ipv4:127.0.0.1"
        assert client_identity("ipv6:[::1]:40002", [], keys) == "ipv6:[::1]"
    assert client_identity("unix:/run/x.sock", [], None) == "unix:/run/x.sock"
    assert client_identity("", [], None) == "unknown"


def test_which_names_the_matching_key_and_allows_agrees():
    assert KEYS.which([(H, "key-one")]) == 0
    assert KEYS.which([(H, "wrong"), ("authorization", "Bearer key-two")]) == 1
    assert KEYS.which([(H, "wrong")]) is None and not KEYS.allows([(H, "wrong")])
    assert KEYS.allows([(H, "key-two")])
