"""TLS: the server's certificate, loaded from disk by every new generation.

A renewed certificate takes effect with a reload; one that cannot be loaded
makes the new generation fail to start, with a one-line reason, and the old
generation keeps serving. The context is made here (the `ssl` module's
errors say little: "[SSL] PEM lib") and handed to uvicorn, which serves on it.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from graceful_http.settings import ServeSettings

CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
# OpenSSL's reasons, as an admin would say them.
REASONS = {
    "KEY_VALUES_MISMATCH": "the private key does not match the certificate",
    "BAD_DECRYPT": "the key password is wrong",
    "BAD_PASSWORD_READ": "the key is encrypted and no password was given (--ssl-keyfile-password-file)",
    "PEM_LIB": "not a PEM certificate and key (or they are swapped)",
    "NO_START_LINE": "no PEM data in the file",
    "CA_MD_TOO_WEAK": "the certificate's signature algorithm is too weak",
    "EE_KEY_TOO_SMALL": "the certificate's key is too small",
}


class TLSError(Exception):
    """The TLS settings cannot be used; the message is the one-line reason."""


def server_context(settings: ServeSettings) -> ssl.SSLContext | None:
    """The TLS context of `settings` (None without --ssl-certfile), loaded from disk now."""
    needs = (("ssl_keyfile", "ssl_certfile"), ("ssl_keyfile_password_file", "ssl_keyfile"),
             ("ssl_ca_certs", "ssl_certfile"))
    for option, needed in needs:
        if getattr(settings, option) is not None and getattr(settings, needed) is None:
            raise TLSError(f"--{option.replace('_', '-')} needs --{needed.replace('_', '-')}")
    if settings.ssl_cert_reqs != "none" and settings.ssl_ca_certs is None:
        raise TLSError(f"--ssl-cert-reqs {settings.ssl_cert_reqs} needs --ssl-ca-certs (the CAs that sign client"
                       " certificates)")
    if settings.ssl_certfile is None:
        return None
    password = _read_password(settings.ssl_keyfile_password_file)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    certfile, keyfile = settings.ssl_certfile, settings.ssl_keyfile
    files = certfile if keyfile is None else f"{certfile} with key {keyfile}"
    try:
        # Always a password (or a callable): without one, OpenSSL asks for it on the terminal.
        context.load_cert_chain(certfile, keyfile, password=password if password is not None else _no_password)
    except _KeyIsEncrypted:
        raise TLSError(f"cannot load the TLS certificate {files}: the key is encrypted and no password was given"
                       " (--ssl-keyfile-password-file)") from None
    except ssl.SSLError as exc:
        reason = _reason(exc)
        if password is not None and reason == REASONS["PEM_LIB"]:
            reason = "the key password is wrong, or " + reason
        raise TLSError(f"cannot load the TLS certificate {files}: {reason}") from None
    except OSError as exc:
        raise TLSError(f"cannot load the TLS certificate {files}: {exc.filename or ''}"
                       f"{': ' if exc.filename else ''}{exc.strerror or exc}") from None
    context.verify_mode = CERT_REQS[settings.ssl_cert_reqs]
    if settings.ssl_ca_certs is not None:
        try:
            context.load_verify_locations(settings.ssl_ca_certs)
        except ssl.SSLError as exc:
            raise TLSError(f"cannot load the CA certificates {settings.ssl_ca_certs}: {_reason(exc)}") from None
        except OSError as exc:
            raise TLSError(f"cannot load the CA certificates {settings.ssl_ca_certs}: {exc.strerror or exc}") from None
    try:
        context.set_ciphers(settings.ssl_ciphers)
    except ssl.SSLError:
        raise TLSError(f"invalid --ssl-ciphers {settings.ssl_ciphers!r}: OpenSSL selects no cipher from it") from None
    return context


class _KeyIsEncrypted(Exception):
    pass


def _no_password():
    raise _KeyIsEncrypted


def _read_password(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as file:
            password = file.read().rstrip(b"\r\n")
    except OSError as exc:
        raise TLSError(f"cannot read the TLS key password file {path}: {exc.strerror}") from None
    if not password:
        raise TLSError(f"the TLS key password file {path} is empty")
    return password


def _reason(exc: ssl.SSLError) -> str:
    reason = exc.reason or ("PEM_LIB" if "PEM lib" in str(exc) else "")
    return REASONS.get(reason, (reason or str(exc)).replace("_", " ").lower())
