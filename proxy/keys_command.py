"""`llm-numbers-proxy keys create | list | rotate | revoke`: runtime virtual keys through a running proxy's
admin API (`--url`, the master key from LLM_PROXY_MASTER_KEY). Prints the API's JSON answer."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


def _call(method: str, url: str, key: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {key}"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = ""
        raise RuntimeError(f"HTTP {e.code}: {message}".rstrip(": ")) from None
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(f"cannot reach the proxy at {url}: {getattr(e, 'reason', e)}") from None


def _create_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"team": args.team, "name": args.name}
    if args.models:
        body["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.budget_usd is not None:
        body["budget"] = {"usd": args.budget_usd, "period": args.budget_period}
    limits = {k: v for k, v in (("rpm", args.rpm), ("tpm", args.tpm)) if v is not None}
    if limits:
        body["limits"] = limits
    if args.expires_at is not None:
        body["expires_at"] = args.expires_at
    if args.metadata is not None:
        body["metadata"] = json.loads(args.metadata)
    return body


def cmd_keys(args: argparse.Namespace) -> int:
    key = os.environ.get("LLM_PROXY_MASTER_KEY")
    if not key:
        print("keys needs the master key in LLM_PROXY_MASTER_KEY", file=sys.stderr)
        return 1
    base = args.url.rstrip("/") + "/admin/keys"
    try:
        if args.keys_command == "create":
            try:
                body = _create_body(args)
            except json.JSONDecodeError as e:
                print(f"--metadata is not JSON: {e}", file=sys.stderr)
                return 1
            out = _call("POST", base, key, body)
            print("the key is shown once: store it now", file=sys.stderr)
        elif args.keys_command == "list":
            query = f"?team={urllib.parse.quote(args.team)}" if args.team else ""
            out = _call("GET", base + query, key)
        elif args.keys_command == "rotate":
            out = _call("POST", f"{base}/{urllib.parse.quote(args.id)}/rotate", key, {"grace_s": args.grace_s})
            print("the new key is shown once: store it now", file=sys.stderr)
        else:
            out = _call("DELETE", f"{base}/{urllib.parse.quote(args.id)}", key)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2))
    return 0


def add_keys_parser(sub: Any) -> None:
    k = sub.add_parser("keys", help="runtime virtual keys through a running proxy (needs the Redis store)")
    k.add_argument("--url", required=True, help="the proxy, e.g. http://127.0.0.1:4000")
    ks = k.add_subparsers(dest="keys_command", required=True)
    c = ks.add_parser("create", help="make a key; prints it once")
    c.add_argument("--team", required=True)
    c.add_argument("--name", required=True)
    c.add_argument("--models", help="comma-separated subset of the team's models")
    c.add_argument("--budget-usd", type=float)
    c.add_argument("--budget-period", default="month", choices=["day", "week", "month", "none"])
    c.add_argument("--rpm", type=int)
    c.add_argument("--tpm", type=int)
    c.add_argument("--expires-at", help="unix seconds or ISO 8601")
    c.add_argument("--metadata", help="a JSON object (at most 4 KiB)")
    ls = ks.add_parser("list", help="every key, without secrets")
    ls.add_argument("--team")
    r = ks.add_parser("rotate", help="a new secret for a key; the old one stays valid for --grace-s")
    r.add_argument("id")
    r.add_argument("--grace-s", type=float, default=0.0)
    d = ks.add_parser("revoke", help="refuse a key everywhere from now on")
    d.add_argument("id")
    k.set_defaults(fn=cmd_keys)
