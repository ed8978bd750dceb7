"""
A second PKCS#11 client for the tests: looks into a region's SoftHSM2 token the way an
operator (or a thief holding the token and its PIN) could, through PyKCS11 (Debian's
python3-pykcs11), independently of the gateway's C code.

SoftHSM2 reads SOFTHSM2_CONF once per process, and each region has its own: every operation
runs in a short child process (`/usr/bin/python3 tokens.py OP JSON`) with that region's
configuration.
"""

import json
import os
import subprocess
import sys

MODULE = "/usr/lib/softhsm/libsofthsm2.so"


class RegionToken:
    """Region `code`'s token as deploy/local made it (or the SoftHSM2 configuration `conf`,
    e.g. a copy of the token directory)."""

    def __init__(self, regions, code, conf=None, pin=None, label=None):
        self.code = code
        self.conf = conf or os.path.join(regions.state, "gw", code, "token", "softhsm2.conf")
        self.label = label or f"domicile-{code}"
        if pin is None:
            with open(regions.secret_path(code, "token.pin")) as f:
                pin = f.read().strip()
        self.pin = pin

    def _run(self, op, **args):
        env = dict(os.environ, SOFTHSM2_CONF=self.conf)
        args.update(token=self.label, pin=self.pin)
        p = subprocess.run(
            ["/usr/bin/python3", os.path.abspath(__file__), op, json.dumps(args)],
            capture_output=True, text=True, timeout=60, env=env,
        )
        if p.returncode != 0:
            raise RuntimeError(f"tokens.py {op} failed: {p.stderr}")
        return json.loads(p.stdout)

    def keys(self):
        """{label: {"extractable": bool, "sensitive": bool}} of the token's secret keys."""
        return self._run("keys")

    def value(self, label):
        """The key's bytes (only for a key made extractable: kek_test_extractable)."""
        return bytes.fromhex(self._run("value", key=label)["hex"])

    def delete(self, label):
        return self._run("delete", key=label)["deleted"]

    def generate(self, label):
        """A new non-extractable AES-256 key labelled `label` (e.g. a key replaced under the
        same label)."""
        return self._run("generate", key=label)

    def unwrap(self, kek_label, wrapped, aad):
        """Open a data key wrapped by the gateway (0x02 || version || nonce || ct || tag, the
        first five bytes in the AAD) with the token's key `kek_label`."""
        return bytes.fromhex(self._run("unwrap", key=kek_label, wrapped=wrapped.hex(), aad=aad.hex())["hex"])


def _main():
    import PyKCS11

    op, args = sys.argv[1], json.loads(sys.argv[2])
    lib = PyKCS11.PyKCS11Lib()
    lib.load(MODULE)
    slots = [s for s in lib.getSlotList(tokenPresent=True) if lib.getTokenInfo(s).label.strip() == args["token"]]
    if not slots:
        raise SystemExit(f"no token {args['token']}")
    s = lib.openSession(slots[0], PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
    s.login(args["pin"])

    def find(label=None):
        tmpl = [(PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY)]
        if label is not None:
            tmpl.append((PyKCS11.CKA_LABEL, label))
        return s.findObjects(tmpl)

    out = {}
    if op == "keys":
        for o in find():
            label, ext, sens = s.getAttributeValue(o, [PyKCS11.CKA_LABEL, PyKCS11.CKA_EXTRACTABLE, PyKCS11.CKA_SENSITIVE])
            out[label] = {"extractable": bool(ext), "sensitive": bool(sens)}
    elif op == "value":
        (v,) = s.getAttributeValue(find(args["key"])[0], [PyKCS11.CKA_VALUE], allAsBinary=True)
        out = {"hex": bytes(v).hex()}
    elif op == "delete":
        objs = find(args["key"])
        for o in objs:
            s.destroyObject(o)
        out = {"deleted": len(objs)}
    elif op == "generate":
        t = [
            (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY), (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_AES),
            (PyKCS11.CKA_VALUE_LEN, 32), (PyKCS11.CKA_TOKEN, True), (PyKCS11.CKA_PRIVATE, True),
            (PyKCS11.CKA_SENSITIVE, True), (PyKCS11.CKA_EXTRACTABLE, False), (PyKCS11.CKA_ENCRYPT, True),
            (PyKCS11.CKA_DECRYPT, True), (PyKCS11.CKA_LABEL, args["key"]),
        ]
        s.generateKey(t, PyKCS11.Mechanism(PyKCS11.CKM_AES_KEY_GEN))
    elif op == "unwrap":
        w, aad = bytes.fromhex(args["wrapped"]), bytes.fromhex(args["aad"])
        assert w[0] == 0x02 and len(w) == 65, w[:1]
        m = PyKCS11.AES_GCM_Mechanism(w[5:17], w[:5] + aad, 128)
        out = {"hex": bytes(s.decrypt(find(args["key"])[0], w[17:], m)).hex()}
    else:
        raise SystemExit(f"unknown op {op}")
    s.logout()
    s.closeSession()
    print(json.dumps(out))


if __name__ == "__main__":
    _main()
