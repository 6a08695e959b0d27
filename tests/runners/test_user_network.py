"""Which name servers an action's user-mode network may use: never one on the host's
loopback (slirp4netns's DNS forwarder is off: through it an action could reach any port on
the host's loopback), the host's other servers, else systemd-resolved's upstreams."""

from __future__ import annotations

from engine.runners.user_network import resolvers


def test_loopback_servers_are_never_given_and_the_upstreams_stand_in(tmp_path):
    host, upstream = tmp_path / "resolv.conf", tmp_path / "upstream.conf"
    host.write_text("nameserver 127.0.0.53\noptions edns0\n")
    upstream.write_text("nameserver 192.0.2.53\nnameserver ::1\n")
    assert resolvers(str(host), str(upstream)) == (["192.0.2.53"], True)
    host.write_text("nameserver 127.0.0.1\nnameserver 198.51.100.1\n")
    assert resolvers(str(host), str(upstream)) == (["198.51.100.1"], True)
    host.write_text("nameserver 198.51.100.1\n")
    assert resolvers(str(host), str(upstream)) == (["198.51.100.1"], False)
    host.write_text("nameserver 127.0.0.53\n")
    assert resolvers(str(host), str(tmp_path / "none")) == ([], True)
