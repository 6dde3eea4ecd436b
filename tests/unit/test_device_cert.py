"""The device's client certificates (tunneld.device_cert): valid under the account CA, renewed when a
third of their life is left, never showing a key."""

from __future__ import annotations

import pickle

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tunneld.accountca import account_ca
from tunneld.device_cert import LIFETIME, RENEW_REMAINING, SKEW, DeviceCertificates

SECRET = bytes(range(32))
ZONE = "home.example.net"
T0 = 1_800_000_000.0


def leaf_of(chain: bytes) -> x509.Certificate:
    leaf, ca = x509.load_pem_x509_certificates(chain)
    leaf.verify_directly_issued_by(ca)
    return leaf


def test_the_first_certificate_is_the_devices_under_the_account_ca() -> None:
    ca = account_ca(SECRET, ZONE)
    certs = DeviceCertificates(ca, "Laptop", T0)
    leaf = leaf_of(certs.current(T0).chain)
    assert leaf.subject.rfc4514_string() == f"CN=laptop.{ZONE}"
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    assert leaf.not_valid_before_utc.timestamp() == T0 - SKEW
    assert leaf.not_valid_after_utc.timestamp() == T0 + LIFETIME
    assert certs.issued == 1


def test_it_is_kept_until_a_third_of_its_life_is_left_then_renewed_with_a_new_key() -> None:
    certs = DeviceCertificates(account_ca(SECRET, ZONE), "laptop", T0)
    first = certs.current(T0)
    last_day = T0 + LIFETIME - RENEW_REMAINING
    assert certs.current(last_day) is first and certs.issued == 1
    renewed = certs.current(last_day + 1)
    assert renewed.key != first.key and certs.issued == 2
    leaf = leaf_of(renewed.chain)
    assert leaf.not_valid_before_utc.timestamp() == int(last_day + 1) - SKEW
    assert leaf.serial_number != leaf_of(first.chain).serial_number
    assert certs.current(last_day + 2) is renewed


def test_a_clock_gone_back_before_the_certificate_began_gets_a_new_one() -> None:
    certs = DeviceCertificates(account_ca(SECRET, ZONE), "laptop", T0)
    first = certs.current(T0)
    assert certs.current(T0 - SKEW) is first  # within the skew: still valid
    earlier = certs.current(T0 - SKEW - 1)
    assert earlier is not first
    assert leaf_of(earlier.chain).not_valid_before_utc.timestamp() <= T0 - SKEW - 1


def test_a_suspended_laptop_waking_after_expiry_gets_a_valid_one() -> None:
    certs = DeviceCertificates(account_ca(SECRET, ZONE), "laptop", T0)
    woken = T0 + 3 * LIFETIME
    leaf = leaf_of(certs.current(woken).chain)
    assert leaf.not_valid_before_utc.timestamp() < woken < leaf.not_valid_after_utc.timestamp()


def test_a_bad_device_name_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="bad device name"):
        DeviceCertificates(account_ca(SECRET, ZONE), "not a label", T0)


def test_no_key_in_repr_and_no_pickling() -> None:
    certs = DeviceCertificates(account_ca(SECRET, ZONE), "laptop", T0)
    assert "PRIVATE" not in repr(certs) and "laptop" in repr(certs)
    assert "PRIVATE" not in repr(certs.current(T0))
    with pytest.raises(TypeError, match="private key"):
        pickle.dumps(certs)
