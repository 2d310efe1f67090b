"""Development tokens for the examples and tests: HS256 JSON Web Tokens
signed with the node's secret, as `hexfleet-node token` mints them.

A real app never holds the secret: its backend mints the token and the app
hands it to the SDK (and returns a fresh one from its TokenProvider).
"""

import base64
import hashlib
import hmac
import json
import os
import time

# The public development secret of a demo node (never for production).
DEV_TOKEN_SECRET = "hexfleet-dev-secret-do-not-use-in-production"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint(role: str, subject: str, ttl_s: int = 3600, secret: str | None = None) -> str:
    secret = secret or os.environ.get("HEXFLEET_TOKEN_SECRET", DEV_TOKEN_SECRET)
    now = int(time.time())
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = _b64(json.dumps({"role": role, "sub": subject, "exp": now + ttl_s, "iat": now}).encode())
    signed = f"{header}.{claims}".encode()
    signature = _b64(hmac.new(secret.encode(), signed, hashlib.sha256).digest())
    return f"{header}.{claims}.{signature}"
