"""Object stores and their credentials: a URL becomes an ``obstore`` store (cached
per URL prefix and credentials) and the key inside it.

Invariant: credentials come from ``storage_options`` or the environment and are
never part of a repr, an error message or a log line: only the URL without user
info or query string (:func:`display_url`) is."""

from __future__ import annotations

import collections
import functools
import hashlib
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from .._errors import SourceError
from ._readers import ObjectURL

__all__ = ["display_url"]

DEFAULT_REMOTE_CHUNK_BYTES = 8 << 20

DEFAULT_CONCURRENCY = 8

_SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gs", "az": "az", "abfs": "az", "abfss": "az"}
_SCHEMES |= {"azure": "az", "http": "http", "https": "http"}
_CREDENTIAL_ENV = {
    "s3": ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
           "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"),
    "gs": ("GOOGLE_SERVICE_ACCOUNT", "GOOGLE_SERVICE_ACCOUNT_PATH", "GOOGLE_SERVICE_ACCOUNT_KEY",
           "GOOGLE_APPLICATION_CREDENTIALS"),
    "az": ("AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_SAS_KEY",
           "AZURE_STORAGE_TOKEN", "AZURE_CLIENT_SECRET", "AZURE_FEDERATED_TOKEN_FILE",
           "AZURE_STORAGE_USE_EMULATOR"),
}  # fmt: skip
_CREDENTIAL_KEYS = re.compile(
    r"(access_key|secret|token|session|sas|service_account|skip_signature|use_emulator|"
    r"credential|bearer|client_id|password|account_key|master_key|private_key|customer_key)",
    re.IGNORECASE,
)
#: Options that are ours, not the store's.
_OUR_OPTIONS = ("client_options", "allow_instance_metadata")


def display_url(url: str) -> ObjectURL:
    """``url`` without user info, query or fragment (where credentials may hide)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return ObjectURL(urlunsplit((parts.scheme, host, parts.path, "", "")))


#: User info and query strings of URLs inside a store's error message.
_URL_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@")
_URL_QUERY = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#]*)[?#][^\s]*")


def _clean(exc: BaseException, secrets_: Sequence[str]) -> str:
    """One line of ``exc`` for a message: URLs in it without user info or query,
    then every known secret (in any encoding the URL had) replaced by ``***``."""
    text = f"{type(exc).__name__}: {exc}".strip()
    text = _URL_QUERY.sub(r"\1", _URL_USERINFO.sub(r"\1", text))
    for s in sorted(secrets_, key=len, reverse=True):
        if s:
            text = text.replace(s, "***")
    text = text.splitlines()[0] if text else text
    return text[:300]


@dataclass(slots=True)
class _Store:
    """A store at the root of a bucket/container/host, and what is secret about it."""

    store: Any
    scheme: str
    root: str  # the display URL of the store root, with a trailing "/"
    secrets: tuple[str, ...]


@functools.cache
def _import_obstore() -> Any:
    try:
        import obstore
    except ImportError as exc:  # pragma: no cover - the 'remote' extra is missing
        raise SourceError(
            "reading from object storage needs obstore: pip install 'asyncpager[remote]'"
        ) from exc
    return obstore


def _make_store(url: str, storage_options: Mapping[str, Any] | None) -> tuple[_Store, str]:
    """The store for ``url`` and the object key inside it."""
    obstore = _import_obstore()
    from obstore.store import AzureStore, GCSStore, HTTPStore, S3Store

    parts = urlsplit(url)
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} in {display_url(url)}")
    options = dict(storage_options or {})
    client: Any = dict(options.pop("client_options", None) or {})
    allow_imds = bool(options.pop("allow_instance_metadata", False))
    secrets_ = tuple(str(v) for k, v in options.items() if _CREDENTIAL_KEYS.search(k) and v)
    in_url = [parts.username, parts.password, parts.query]
    in_url += [v for vs in parse_qs(parts.query).values() for v in vs]
    secrets_ += tuple({form for s in in_url if s for form in (s, unquote(s))})
    # The bucket or container: the host, never the user info before it.
    bucket = parts.netloc.rpartition("@")[2]
    # A plain-http endpoint (a local S3-compatible server, an emulator), given in the
    # options under any of the store's spellings or in the environment, is allowed.
    endpoints = [str(v) for k, v in options.items() if "endpoint" in k.lower()]
    endpoints += [v for k, v in os.environ.items() if k.startswith(("AWS_ENDPOINT", "AZURE_"))]
    if scheme == "http" or any(e.startswith("http://") for e in endpoints):
        client.setdefault("allow_http", True)
    client.setdefault("connect_timeout", timedelta(seconds=10))
    retry: Any = {"max_retries": 0}  # we retry ourselves, so the policy is visible and tested
    key = parts.path.lstrip("/")
    if scheme != "http":
        _check_credentials(scheme, options, allow_imds, display_url(url))
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES))
    recipe = repr((scheme, parts.netloc, sorted(options.items()), sorted(client.items()), env))
    digest = hashlib.sha256(recipe.encode()).hexdigest()
    root = display_url(urlunsplit((parts.scheme, parts.netloc, "/", "", "")))
    with _STORES_LOCK:
        cached = _STORES.get(digest)
        if cached is not None:
            _STORES.move_to_end(digest)
            return cached, key
    store: Any
    try:
        if scheme == "s3":
            store = S3Store(bucket, client_options=client, retry_config=retry, **options)
        elif scheme == "gs":
            store = GCSStore(bucket, client_options=client, retry_config=retry, **options)
        elif scheme == "az":
            store = AzureStore(bucket, client_options=client, retry_config=retry, **options)
        else:
            base = urlunsplit((parts.scheme, parts.netloc, "", "", ""))  # no query: see README
            store = HTTPStore.from_url(base, client_options=client, retry_config=retry)
    except (obstore.exceptions.BaseError, ValueError, TypeError) as exc:
        raise SourceError(
            f"{display_url(url)}: cannot configure the store: {_clean(exc, secrets_)}"
        ) from None
    made = _Store(store, scheme, root, secrets_)
    with _STORES_LOCK:
        _STORES[digest] = made
        while len(_STORES) > _MAX_STORES:
            _STORES.popitem(last=False)
    return made, key


#: Stores already made, by a digest of everything that configures them (options,
#: client options, the credential environment): making one costs ~40 ms (an HTTP
#: client and its TLS roots), and read_index then open, or several models from one
#: bucket, would otherwise pay it each time. Bounded, least recently used dropped.
_STORES: collections.OrderedDict[str, _Store] = collections.OrderedDict()
_STORES_LOCK = threading.Lock()
_MAX_STORES = 16
_ENV_PREFIXES = ("AWS_", "GOOGLE_", "AZURE_")


def _check_credentials(
    scheme: str, options: Mapping[str, Any], allow_imds: bool, url: ObjectURL
) -> None:
    """Refuse at open, with a message saying where credentials come from, when none
    are given: otherwise the store would fall back to a cloud metadata endpoint and
    fail later, slowly and obscurely."""
    if allow_imds or any(_CREDENTIAL_KEYS.search(k) for k in options):
        return
    names = _CREDENTIAL_ENV[scheme]
    if any(os.environ.get(n) for n in names):
        return
    raise SourceError(
        f"{url}: no credentials for {scheme}://: set one of {', '.join(names)} in the "
        "environment, or pass them in storage_options (or skip_signature=True for a "
        "public bucket; allow_instance_metadata=True to use the cloud's metadata service)"
    )
