"""TLS certificates and SuperNode authentication keys for a federation of hospitals.

``certificates`` writes a certificate authority (``ca.crt``, ``ca.key``) and a SuperLink server
certificate signed by it (``server.pem``, ``server.key``) whose subject alternative names list
every host name and IP address the SuperNodes use to reach the SuperLink. The SuperNodes and
the ``flwr`` CLI verify the server against ``ca.crt``; ``ca.key`` stays with whoever runs the
federation.

``supernode-keys`` writes one elliptic-curve key pair per site (NIST P-384, OpenSSH format, as
``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` expect):
``NAME`` (private, stays at the hospital) and ``NAME.pub`` (registered at the SuperLink).

Usage::

    python -m train.deploy.credentials certificates --out certs --host superlink.example.org
    python -m train.deploy.credentials supernode-keys --out keys site1 site2 site3
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY_DAYS = 825  # the longest server-certificate lifetime that browsers and TLS stacks accept


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    """Write ``data``; private keys are readable by their owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _subject_names(hosts: list[str]) -> list[x509.GeneralName]:
    """DNS names and IP addresses for the certificate's subjectAltName."""
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["localhost", "127.0.0.1", "::1", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_certificates(out: str | Path, hosts: list[str], days: int = VALIDITY_DAYS) -> dict:
    """Write ``ca.crt``/``ca.key`` and the SuperLink's ``server.pem``/``server.key`` to ``out``.

    The server certificate is valid for ``localhost``, the loopback addresses and ``hosts``.
    Returns the paths by role (``ca``, ``ca_key``, ``server_cert``, ``server_key``).
    """
    out = Path(out)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Vessel federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_name = hosts[0] if hosts else "localhost"
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_subject_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    return {
        "ca": _write(out / "ca.crt", ca_cert.public_bytes(pem)),
        "ca_key": _write(out / "ca.key", _private_pem(ca_key), private=True),
        "server_cert": _write(out / "server.pem", server_cert.public_bytes(pem)),
        "server_key": _write(out / "server.key", _private_pem(server_key), private=True),
    }


def make_supernode_key(out: str | Path, name: str) -> tuple[Path, Path]:
    """Write the SuperNode key pair ``out/name`` (private) and ``out/name.pub`` (OpenSSH)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    out = Path(out)
    return (
        _write(out / name, private, private=True),
        _write(out / f"{name}.pub", public + f" {name}\n".encode()),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m train.deploy.credentials",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    certs = commands.add_parser("certificates", help="CA and SuperLink server certificate")
    certs.add_argument("--out", required=True, type=Path)
    certs.add_argument(
        "--host",
        action="append",
        default=[],
        help="DNS name or IP address of the SuperLink (repeatable)",
    )
    certs.add_argument("--days", type=int, default=VALIDITY_DAYS)
    keys = commands.add_parser("supernode-keys", help="one authentication key pair per site")
    keys.add_argument("--out", required=True, type=Path)
    keys.add_argument("names", nargs="+", help="site names, e.g. site1 site2")
    args = parser.parse_args(argv)
    if args.command == "certificates":
        for role, path in make_certificates(args.out, args.host, args.days).items():
            print(f"{role}: {path}")
    else:
        for name in args.names:
            private, public = make_supernode_key(args.out, name)
            print(f"{name}: {private} (stays at the site), {public} (register at the SuperLink)")


if __name__ == "__main__":
    main()
