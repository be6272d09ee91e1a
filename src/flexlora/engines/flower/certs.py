"""Test credentials for a Flower deployment: a CA, a SuperLink TLS certificate signed by it, and
one SuperNode authentication key pair per node.

For trials and CI only: the CA key is written unencrypted next to the certificates. In
production, use your organisation's CA and keep every private key on its own machine.

- TLS: the SuperLink gets `server.pem` + `server.key` (+ `ca.crt`); SuperNodes and the `flwr`
  CLI verify it with `ca.crt`. The certificate names every host/IP the nodes will dial.
- SuperNode authentication (Flower 1.41, CLI-managed): each node has an EC P-384 key pair in
  OpenSSH format; the SuperLink runs with `--enable-supernode-auth`, each public key is
  registered with `flwr supernode register <key>.pub <connection>`, and the node starts with
  `--auth-supernode-private-key <key>`. Unregistered nodes are refused.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)
    return path


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_tls_certificates(out_dir: str | Path, hosts: list[str] = ("127.0.0.1", "localhost"), days: int = 30) -> dict[str, Path]:
    """ca.crt/ca.key and server.pem/server.key for a SuperLink reachable under `hosts` (IPs or
    DNS names, all put in the certificate's subjectAltName)."""
    if not hosts:
        raise ValueError("the SuperLink certificate needs at least one host name or IP")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flexlora test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(list(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return {
        "ca_cert": _write(out / "ca.crt", ca_cert.public_bytes(pem)),
        "ca_key": _write(out / "ca.key", _key_pem(ca_key), private=True),
        "server_cert": _write(out / "server.pem", server_cert.public_bytes(pem)),
        "server_key": _write(out / "server.key", _key_pem(server_key), private=True),
    }


def make_node_keys(out_dir: str | Path, names: list[str]) -> dict[str, tuple[Path, Path]]:
    """name -> (private key, public key): EC P-384 pairs in OpenSSH format, as
    `flower-supernode --auth-supernode-private-key` and `flwr supernode register` read them
    (the same as `ssh-keygen -t ecdsa -b 384 -N "" -f <name>`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = {}
    for name in names:
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        keys[name] = (
            _write(out / name, private, private=True),
            _write(out / f"{name}.pub", public + f" {name}\n".encode()),
        )
    return keys
