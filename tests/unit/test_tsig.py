"""tunneld.proto.tsig against dnspython's ``dns.tsig`` (an independent implementation), both ways.

Known answers: a message signed by dnspython's ``dns.tsig.sign`` at a fixed time verifies with ours, and a
message signed by ours verifies with dnspython's ``dns.tsig.validate``, for hmac-sha256 and hmac-md5,
as a request and as a reply over a request MAC. (A third-party vector, from miekg/dns, is in
test_dnsupdate.py.) Then the server's check order (RFC 8945 §5.2: key, MAC, time) and the key's repr.
"""

from __future__ import annotations

import contextlib
import io
import struct
import time

import dns.flags
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TSIG
import dns.rrset
import dns.tsig
import pytest

from tunneld.proto.errors import ParseError
from tunneld.proto.tsig import (
    BADKEY,
    BADSIG,
    BADTIME,
    MAX_FUDGE,
    TsigError,
    TsigKey,
    TsigSession,
    check,
    find_tsig,
    sign,
    unsigned_error,
    verify,
)

T = 1_700_000_000
NAME = dns.name.from_text("key.example.")
SECRET = bytes(range(32))
ALGORITHMS = [("hmac-sha256", dns.tsig.HMAC_SHA256), ("hmac-md5", dns.tsig.HMAC_MD5)]


def message(msg_id: int = 0x4242) -> bytes:
    msg = dns.message.make_query("host.example.", "AAAA", id=msg_id)
    msg.use_edns(0, payload=1232)
    return msg.to_wire()


def dnspython_sign(wire: bytes, key: dns.tsig.Key, request_mac: bytes = b"") -> tuple[bytes, bytes]:
    template = dns.rdtypes.ANY.TSIG.TSIG(  # type: ignore[no-untyped-call]  # unannotated in dnspython
        dns.rdataclass.ANY, dns.rdatatype.TSIG, key.algorithm, 0, 300, b"",
        struct.unpack_from("!H", wire)[0], 0, b"")
    rdata, _ = dns.tsig.sign(wire, key, template, T, request_mac)  # type: ignore[no-untyped-call]
    rr = io.BytesIO()
    dns.rrset.from_rdata(key.name, 0, rdata).to_wire(rr)
    arcount = struct.unpack_from("!H", wire, 10)[0]
    signed = wire[:10] + struct.pack("!H", arcount + 1) + wire[12:] + rr.getvalue()
    return signed, rdata.mac


def dnspython_validate(wire: bytes, key: dns.tsig.Key, request_mac: bytes = b"") -> None:
    record = find_tsig(wire)
    assert record is not None
    msg = dns.message.from_wire(wire, keyring=False)
    assert msg.tsig is not None
    dns.tsig.validate(  # type: ignore[no-untyped-call]  # unannotated in dnspython
        wire, key, msg.tsig.name, msg.tsig[0], T, request_mac, record.start)


@pytest.mark.parametrize(("ours", "theirs"), ALGORITHMS)
def test_dnspython_signs_we_verify(ours: str, theirs: dns.name.Name) -> None:
    key = TsigKey(NAME, SECRET, ours)
    dkey = dns.tsig.Key(NAME, SECRET, theirs)
    request, request_mac = dnspython_sign(message(), dkey)
    assert verify(request, key, b"", T).mac == request_mac
    reply, _ = dnspython_sign(message(), dkey, request_mac)
    verify(reply, key, request_mac, T)
    with pytest.raises(TsigError, match="mac"):
        verify(reply, key, b"", T)  # a reply is signed over the request MAC


@pytest.mark.parametrize(("ours", "theirs"), ALGORITHMS)
def test_we_sign_dnspython_verifies(ours: str, theirs: dns.name.Name) -> None:
    key = TsigKey(NAME, SECRET, ours)
    dkey = dns.tsig.Key(NAME, SECRET, theirs)
    request, request_mac = sign(message(), key, T)
    dnspython_validate(request, dkey)
    reply, _ = sign(message(), key, T, request_mac)
    dnspython_validate(reply, dkey, request_mac)
    with pytest.raises(dns.tsig.BadSignature):
        dnspython_validate(reply, dkey)


def test_check_order_key_mac_time() -> None:
    key = TsigKey(NAME, SECRET)
    keys = {NAME: key}
    wire, _ = sign(message(), key, T)
    assert check(wire, keys, T + 300)[0] == key  # within the fudge
    other = TsigKey(dns.name.from_text("other."), SECRET)
    bad_name, _ = sign(message(), other, T - 1000)  # unknown key and stale: BADKEY first
    with pytest.raises(TsigError) as e:
        check(bad_name, keys, T)
    assert e.value.error == BADKEY
    forged, _ = sign(message(), TsigKey(NAME, bytes(32)), T - 1000)  # bad MAC and stale: BADSIG first
    with pytest.raises(TsigError) as e:
        check(forged, keys, T)
    assert e.value.error == BADSIG
    with pytest.raises(TsigError) as e:
        check(wire, keys, T + 301)
    assert e.value.error == BADTIME and e.value.tsig is not None and e.value.tsig.time_signed == T
    md5 = TsigKey(NAME, SECRET, "hmac-md5")
    with pytest.raises(TsigError) as e:  # right name, wrong algorithm: BADKEY
        check(sign(message(), md5, T)[0], keys, T)
    assert e.value.error == BADKEY


def test_a_server_refuses_a_fudge_over_300_s_with_badtime_after_the_mac() -> None:
    """A wider fudge would stretch the time a captured request can be replayed (RFC 8945 §5.2.3 answers
    a request outside the window the server accepts with BADTIME). The MAC is checked first, so that a
    forgery is BADSIG and the BADTIME answer can be signed."""
    key = TsigKey(NAME, SECRET)
    keys = {NAME: key}
    assert MAX_FUDGE == 300
    assert check(sign(message(), key, T, fudge=MAX_FUDGE)[0], keys, T)[1].fudge == MAX_FUDGE
    for fudge in (MAX_FUDGE + 1, 0xFFFF):
        with pytest.raises(TsigError, match="fudge") as e:
            check(sign(message(), key, T, fudge=fudge)[0], keys, T)
        assert e.value.error == BADTIME and e.value.tsig is not None and e.value.tsig.fudge == fudge
    forged, _ = sign(message(), TsigKey(NAME, bytes(32)), T, fudge=0xFFFF)
    with pytest.raises(TsigError) as e:
        check(forged, keys, T)
    assert e.value.error == BADSIG
    # A client checking a reply is not bound by it (the reply is tied to its request's MAC).
    verify(sign(message(), key, T, fudge=0xFFFF)[0], key, b"", T)


def test_unsigned_error_answer_parses_with_dnspython() -> None:
    key = TsigKey(NAME, SECRET)
    request, _ = sign(message(), key, T)
    record = find_tsig(request)
    assert record is not None
    answer = dns.message.make_response(dns.message.from_wire(request, keyring=False))
    answer.tsig = None
    wire = unsigned_error(answer.to_wire(), record, BADSIG)
    parsed = dns.message.from_wire(wire, keyring=False)
    assert parsed.tsig is not None and parsed.tsig[0].error == BADSIG and parsed.tsig[0].mac == b""


def test_key_repr_hides_the_secret() -> None:
    key = TsigKey(NAME, b"\xab" * 32)
    assert "ab" not in repr(key).lower().replace("hmac", "") and "secret" not in repr(key)
    assert "ab" not in repr(TsigSession(key)).lower().replace("hmac", "")
    with pytest.raises(ValueError):
        TsigKey(NAME, b"")
    with pytest.raises(ValueError):
        TsigKey(NAME, SECRET, "hmac-sha1")


def test_unsolicited_messages_verify_without_request_mac() -> None:
    """An LLQ event is signed with no request MAC; a session verifies it even when its ID is one of our
    requests' (whose MAC it then does not match)."""
    key = TsigKey(NAME, SECRET)
    session = TsigSession(key)
    now = time.time()
    session.sign(message(7), now)
    event = dns.message.Message(id=7)
    event.flags = dns.flags.QR
    wire, _ = sign(event.to_wire(), key, int(now))
    assert session.verify(wire, now).original_id == 7
    with pytest.raises(TsigError, match="time"):
        session.verify(wire, now + 301)


def test_find_tsig_raises_only_parse_error() -> None:
    wire, _ = sign(message(), TsigKey(NAME, SECRET), T)
    for cut in range(len(wire)):
        with contextlib.suppress(ParseError):
            find_tsig(wire[:cut])
