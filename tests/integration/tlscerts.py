"""Certificates and PSK files for the TLS tests, made with GnuTLS's own
tools (certtool, psktool from gnutls-bin) in a temporary directory.

Layout (what stratad --tls-certificates, QEMU's tls-creds-x509 and libnbd's
tls-certificates= read):
  server/   ca-cert.pem server-cert.pem server-key.pem
  NAME/     ca-cert.pem client-cert.pem client-key.pem   (a client)
Clients: alice, bob, carol (all signed by the CA), expired (signed by the
CA, valid only in 2020), stranger (signed by another CA, with that CA's
ca-cert.pem: it trusts neither the server nor is trusted), foreign (trusts
the server's CA, but its certificate is signed by another CA), revoked
(signed by the CA and revoked in server/ca-crl.pem), nocert (only
ca-cert.pem: no client certificate).
"""
import os
import subprocess

from harness import need, tmpdir

DN = "CN={cn},O=Example,C=GB"     # RFC 4514, as certtool -i prints Subject


def _run(args):
    subprocess.run(args, check=True, timeout=60, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def _template(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


class Certs:
    def __init__(self):
        need("certtool", "psktool")
        self.dir = tmpdir()
        d = self.dir
        self.ca_key, self.ca_cert = self._ca("ca", "strata test CA")
        other_key, other_cert = self._ca("other-ca", "some other CA")
        self.server = os.path.join(d, "server")
        os.mkdir(self.server)
        self._copy(self.ca_cert, os.path.join(self.server, "ca-cert.pem"))
        self._cert(self.server, "server", self.ca_cert, self.ca_key,
                   ["organization = Example", "cn = localhost",
                    "dns_name = localhost", "ip_address = 127.0.0.1",
                    "tls_www_server", "encryption_key", "signing_key",
                    "expiration_days = 30"])
        for cn in ("alice", "bob", "carol"):
            self.client(cn, self.ca_cert, self.ca_key)
        self.client("expired", self.ca_cert, self.ca_key, dates=(
            'activation_date = "2020-01-01 00:00:00 UTC"',
            'expiration_date = "2020-12-31 00:00:00 UTC"'))
        self.client("stranger", other_cert, other_key)
        self.client("foreign", other_cert, other_key)
        # revoked: signed by the CA, then listed in server/ca-crl.pem
        revoked = self.client("revoked", self.ca_cert, self.ca_key)
        tpl = _template(self.path("crl.info"), ["crl_next_update = 30",
                                                "crl_number = 1"])
        _run(["certtool", "--generate-crl", "--load-ca-privkey", self.ca_key,
              "--load-ca-certificate", self.ca_cert, "--load-certificate",
              os.path.join(revoked, "client-cert.pem"), "--template", tpl,
              "--outfile", os.path.join(self.server, "ca-crl.pem")])
        nocert = os.path.join(d, "nocert")
        os.mkdir(nocert)
        self._copy(self.ca_cert, os.path.join(nocert, "ca-cert.pem"))

    def path(self, name):
        return os.path.join(self.dir, name)

    @staticmethod
    def dn(cn):
        return DN.format(cn=cn)

    def _copy(self, src, dst):
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read())

    def _ca(self, name, cn):
        key = self.path(name + "-key.pem")
        cert = self.path(name + "-cert.pem")
        tpl = _template(self.path(name + ".info"),
                        [f"cn = {cn}", "ca", "cert_signing_key",
                         "expiration_days = 30"])
        _run(["certtool", "--generate-privkey", "--key-type", "ecdsa",
              "--outfile", key])
        _run(["certtool", "--generate-self-signed", "--load-privkey", key,
              "--template", tpl, "--outfile", cert])
        return key, cert

    def _cert(self, outdir, role, ca_cert, ca_key, lines):
        key = os.path.join(outdir, role + "-key.pem")
        cert = os.path.join(outdir, role + "-cert.pem")
        tpl = _template(os.path.join(outdir, role + ".info"), lines)
        _run(["certtool", "--generate-privkey", "--key-type", "ecdsa",
              "--outfile", key])
        _run(["certtool", "--generate-certificate", "--load-ca-certificate",
              ca_cert, "--load-ca-privkey", ca_key, "--load-privkey", key,
              "--template", tpl, "--outfile", cert])

    def client(self, cn, ca_cert, ca_key, dates=("expiration_days = 30",)):
        d = self.path(cn)
        os.mkdir(d)
        self._copy(ca_cert if cn == "stranger" else self.ca_cert,
                   os.path.join(d, "ca-cert.pem"))
        self._cert(d, "client", ca_cert, ca_key,
                   ["country = GB", "organization = Example", f"cn = {cn}",
                    "tls_www_client", "encryption_key", "signing_key",
                    *dates])
        return d


def psk_file(path, *users):
    """A psktool key file with a fresh key for each user; returns path."""
    need("psktool")
    for u in users:
        _run(["psktool", "-u", u, "-p", path])
    return path


def psk_keys(path):
    """{username: hexkey} of a psktool file."""
    out = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                u, k = line.split(":", 1)
                out[u] = k
    return out
