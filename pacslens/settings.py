"""PacsLens settings: one file, every process setting from the environment.

Typed helpers raise ImproperlyConfigured on a bad value so a typo in a unit
file stops the process at start instead of misbehaving at 3 a.m.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from django.utils.crypto import get_random_string

# A pure function (Django itself only): safe to import before the apps load.
from routing.validators import ae_title_problem

BASE_DIR = Path(__file__).resolve().parent.parent


def envstr(name: str, default: str) -> str:
    return os.environ.get(name, default)


def envsecret(name: str, default: str | None) -> str | None:
    """A secret from NAME, or from the file named by NAME_FILE (systemd credentials, k8s secrets)."""
    path = os.environ.get(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE={path!r} cannot be read: {exc}") from exc
    return os.environ.get(name, default)


def envbool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean (use true/false)")


def envint(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not an integer") from None
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name}={number} is below the minimum {minimum}")
    if maximum is not None and number > maximum:
        raise ImproperlyConfigured(f"{name}={number} is above the maximum {maximum}")
    return number


def envfloat(name: str, default: float, *, minimum: float | None = None) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not a number") from None
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name}={number} is below the minimum {minimum}")
    return number


def envaetitle(name: str, default: str) -> str:
    value = os.environ.get(name, default)
    problem = ae_title_problem(value)
    if problem:
        raise ImproperlyConfigured(f"{name}={value!r}: {problem}")
    return value.strip()


def envnetworks(name: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    networks = []
    for item in envstr(name, "").split(","):
        if item.strip():
            try:
                networks.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise ImproperlyConfigured(f"{name}: {item.strip()!r} is not an IP address or network") from None
    return networks


def envuidroot(name: str) -> str:
    """An org root for the UIDs we mint: digits and dots, short enough to leave 32+ digits."""
    value = os.environ.get(name, "").strip().rstrip(".")
    if value and (len(value) > 32 or not re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+", value)):
        raise ImproperlyConfigured(
            f"{name}={value!r} is not a DICOM UID root of at most 32 characters (e.g. 1.2.826.0.1.3680043.10.1234)"
        )
    return value


def envfile(name: str, *, required: bool) -> Path | None:
    """A path to a file that must exist (certificates, keys); None when unset and not required."""
    value = os.environ.get(name, "").strip()
    if not value:
        if required:
            raise ImproperlyConfigured(f"{name} must be set")
        return None
    path = Path(value)
    if not path.is_file():
        raise ImproperlyConfigured(f"{name}={value!r} is not a readable file")
    return path


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ImproperlyConfigured(f"the package {name!r} is not installed: pip install -r requirements.txt")
    return Path(spec.origin).parent


DEBUG = envbool("PACSLENS_DEBUG", False)
DATA_DIR = Path(envstr("PACSLENS_DATA_DIR", str(BASE_DIR / "var"))).resolve()

_secret = envsecret("PACSLENS_SECRET_KEY", None)
if not _secret:
    # Development default: a random key kept in the data dir, so sessions survive restarts
    # without anyone committing a secret. Production sets PACSLENS_SECRET_KEY.
    _key_file = DATA_DIR / "secret_key"
    if _key_file.exists():
        _secret = _key_file.read_text().strip()
    else:
        _secret = get_random_string(64)
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        # Created 0600, never written first and restricted after: no moment when others can read it.
        try:
            _fd = os.open(_key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process starting at the same moment made it
            _secret = _key_file.read_text().strip()
        else:
            with os.fdopen(_fd, "w") as _file:
                _file.write(_secret)
SECRET_KEY = _secret

# Fernet keys (comma-separated, newest first) that encrypt stored destination secrets; unset: a
# key file made in the data dir (results/models/sealed.py). Keep a copy apart from the backups.
SECRETS_KEYS = [k.strip() for k in (envsecret("PACSLENS_SECRETS_KEY", None) or "").split(",") if k.strip()]

ALLOWED_HOSTS = [
    h.strip() for h in envstr("PACSLENS_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",") if h.strip()
]
CSRF_TRUSTED_ORIGINS = [o.strip() for o in envstr("PACSLENS_CSRF_TRUSTED_ORIGINS", "").split(",") if o.strip()]

# DICOM listener
AE_TITLE = envaetitle("PACSLENS_AE_TITLE", "PACSLENS")
DICOM_HOST = envstr("PACSLENS_DICOM_HOST", "0.0.0.0")
DICOM_PORT = envint("PACSLENS_DICOM_PORT", 11112, minimum=1, maximum=65535)
DICOM_LISTENER_PROCESSES = envint("PACSLENS_DICOM_LISTENER_PROCESSES", 2, minimum=1, maximum=64)
DICOM_MAX_ASSOCIATIONS = envint("PACSLENS_DICOM_MAX_ASSOCIATIONS", 20, minimum=1)
# Open connections (associations included) per peer address and in all, per listener process:
# beyond them a new connection is closed at once, so a flood costs neither threads nor memory.
DICOM_MAX_ASSOCIATIONS_PER_PEER = envint("PACSLENS_DICOM_MAX_ASSOCIATIONS_PER_PEER", 8, minimum=1)
DICOM_MAX_CONNECTIONS = envint("PACSLENS_DICOM_MAX_CONNECTIONS", 5 * DICOM_MAX_ASSOCIATIONS, minimum=1)
DICOM_ACSE_TIMEOUT = envfloat("PACSLENS_DICOM_ACSE_TIMEOUT", 30.0, minimum=1)
DICOM_DIMSE_TIMEOUT = envfloat("PACSLENS_DICOM_DIMSE_TIMEOUT", 60.0, minimum=1)
DICOM_NETWORK_TIMEOUT = envfloat("PACSLENS_DICOM_NETWORK_TIMEOUT", 60.0, minimum=1)
DICOM_ACCEPT_ANY_CALLING_AE = envbool("PACSLENS_ACCEPT_ANY_CALLING_AE", False)
DICOM_SHUTDOWN_GRACE = envfloat("PACSLENS_DICOM_SHUTDOWN_GRACE", 30.0, minimum=0)
# Identifiers we mint (results/deliver/identity.py): DICOM UIDs under the site's own org root, or "" for
# UUID-derived 2.25 UIDs; the FHIR Observation identifier under the site's own system URI, or
# "" for urn:ietf:rfc:3986 with a urn:uuid value. Both apply to results made after a change.
DICOM_UID_ROOT = envuidroot("PACSLENS_UID_ROOT")
FHIR_IDENTIFIER_SYSTEM = envstr("PACSLENS_FHIR_IDENTIFIER_SYSTEM", "").strip()
# DICOM TLS (docs/tls.md): off, tls (the main port speaks TLS only) or both (plain on
# DICOM_PORT, TLS on DICOM_TLS_PORT). The CA file holds the CAs trusted for client certificates
# and for the peers our SCUs connect to with TLS.
DICOM_TLS_MODE = envstr("PACSLENS_DICOM_TLS_MODE", "off").strip().lower() or "off"
if DICOM_TLS_MODE not in ("off", "tls", "both"):
    raise ImproperlyConfigured(f"PACSLENS_DICOM_TLS_MODE={DICOM_TLS_MODE!r} is not one of off, tls, both")
DICOM_TLS_PORT = envint("PACSLENS_DICOM_TLS_PORT", 2762, minimum=1, maximum=65535)
DICOM_TLS_REQUIRE_CLIENT_CERT = envbool("PACSLENS_DICOM_TLS_REQUIRE_CLIENT_CERT", True)
# Off by default: DICOM peers are usually addressed by IP, and their certificates name hosts.
DICOM_TLS_CHECK_HOSTNAME = envbool("PACSLENS_DICOM_TLS_CHECK_HOSTNAME", False)
_tls_listener = DICOM_TLS_MODE != "off"
DICOM_TLS_CERT = envfile("PACSLENS_DICOM_TLS_CERT", required=_tls_listener)
DICOM_TLS_KEY = envfile("PACSLENS_DICOM_TLS_KEY", required=_tls_listener)
DICOM_TLS_CA = envfile("PACSLENS_DICOM_TLS_CA", required=_tls_listener and DICOM_TLS_REQUIRE_CLIENT_CERT)
# Refuse new data while free space under the data dir is below this many MiB.
DISK_FREE_FLOOR_MB = envint("PACSLENS_DISK_FREE_FLOOR_MB", 1024, minimum=0)
# /healthz and /metrics warn below this many MiB, before the floor refuses data.
DISK_FREE_WARNING_MB = envint(
    "PACSLENS_DISK_FREE_WARNING_MB", max(DISK_FREE_FLOOR_MB * 4, DISK_FREE_FLOOR_MB + 1024), minimum=DISK_FREE_FLOOR_MB
)
# Received pixel data is deleted this many days after every delivery of its study succeeded.
RETENTION_DAYS = envfloat("PACSLENS_RETENTION_DAYS", 7.0, minimum=0)

# Study completeness (seconds)
STUDY_QUIET_PERIOD = envint("PACSLENS_STUDY_QUIET_PERIOD", 60, minimum=1)
STUDY_RELEASE_GRACE = envfloat("PACSLENS_STUDY_RELEASE_GRACE", 2.0, minimum=0)
STUDY_FORCE_COMPLETE_AFTER = envint("PACSLENS_STUDY_FORCE_COMPLETE_AFTER", 3600, minimum=1)
SWEEP_INTERVAL_MINUTES = 1

HTTP_PORT = envint("PACSLENS_HTTP_PORT", 8000, minimum=1, maximum=65535)
# STOW-RS receive endpoint: the largest request body accepted (bytes); bigger ones get 413.
STOW_MAX_BYTES = envint("PACSLENS_STOW_MAX_BYTES", 2 * 1024**3, minimum=1024)

# Inference (onnxruntime). Provider: auto (default: CUDA when this onnxruntime build has it,
# else CPU), cpu, or cuda (required: refuse to run without it).
INFERENCE_PROVIDER = envstr("PACSLENS_INFERENCE_PROVIDER", "auto").strip().lower()
if INFERENCE_PROVIDER not in ("cpu", "cuda", "auto"):
    raise ImproperlyConfigured(f"PACSLENS_INFERENCE_PROVIDER={INFERENCE_PROVIDER!r} is not one of cpu, cuda, auto")
# 0 lets onnxruntime use every core; with several workers per host, set it to cores / workers.
INFERENCE_INTRA_OP_THREADS = envint("PACSLENS_INFERENCE_INTRA_OP_THREADS", 0, minimum=0)
INFERENCE_INTER_OP_THREADS = envint("PACSLENS_INFERENCE_INTER_OP_THREADS", 1, minimum=0)
# One model run longer than this is stopped and recorded as a timeout failure.
INFERENCE_TIMEOUT = envfloat("PACSLENS_INFERENCE_TIMEOUT", 120.0, minimum=1)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_htmx",
    "template_partials",
    "axes",
    "django_q",
    "routing",
    "results",
    # The site as a whole: project-wide management commands (pacslens/management); no models.
    "pacslens",
    # The automation API (/api/v1/, docs/api.md): clients, tokens and the django-ninja endpoints.
    # Not "ninja" itself: an installed app is imported by every process, the DICOM listener too,
    # and ninja brings pydantic (~10 MiB each). Its Swagger UI files are served from NINJA_DIR below.
    "pacslens.api",
]

MIDDLEWARE = [
    # First, so every log line of the request carries its id (pacslens/logs.py).
    "pacslens.middleware.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # Who changed a user, group, permission or token (the audit log), however the change is made.
    "pacslens.middleware.AuditRequestMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # Last, as django-axes requires: it turns a locked-out login into its lockout response.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "pacslens.urls"

# django-ninja's templates and static files: its Swagger UI page (pacslens/api/main.py) is served
# from them as if "ninja" were an installed app, which it is not (INSTALLED_APPS says why).
NINJA_DIR = package_dir("ninja")

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates", NINJA_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "pacslens.context_processors.version",
            ],
        },
    },
]

WSGI_APPLICATION = "pacslens.wsgi.application"


def _database() -> dict[str, Any]:
    url = os.environ.get("DATABASE_URL", "")
    if url:
        try:
            return dict(dj_database_url.parse(url, conn_max_age=60, conn_health_checks=True))
        except Exception as exc:  # the library raises several types for a bad URL
            raise ImproperlyConfigured(f"DATABASE_URL is not a usable database URL: {exc}") from None
    # The embedded default. Listener, workers and web all write: WAL lets readers proceed,
    # the busy timeout and IMMEDIATE transactions make writers queue instead of failing
    # with "database is locked".
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": DATA_DIR / "pacslens.sqlite3",
        "OPTIONS": {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            # synchronous=FULL: in WAL mode NORMAL survives a process crash but not a power cut, and
            # the listener answers Success only once the row is durable (one fsync per commit).
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;",
        },
        # A file, not shared-cache memory: tests run the listener in threads, and shared-cache
        # table locks fail at once instead of waiting out the busy timeout.
        # One per test process, so concurrent test runs never share (and corrupt) a database.
        "TEST": {"NAME": str(Path(tempfile.gettempdir()) / f"pacslens-test-{os.getpid()}.sqlite3")},
    }


DATABASES = {"default": _database()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 12}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = envstr("PACSLENS_TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
# The staff UI's own login page (the admin's accepts only is_staff accounts; informaticists are not).
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
STATICFILES_DIRS = [BASE_DIR / "static", NINJA_DIR / "static"]

# Login throttling (django-axes): after AXES_FAILURE_LIMIT failed logins for one user name from one
# address, that pair is locked out for AXES_COOLOFF_TIME hours. The axes backend goes first.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = envint("PACSLENS_LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = envfloat("PACSLENS_LOGIN_LOCKOUT_HOURS", 0.25, minimum=0.01)
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "ui/locked_out.html"
# Behind a reverse proxy REMOTE_ADDR is the proxy, which would make the lockout per user name
# alone (anyone could lock a colleague out). The client address comes from X-Forwarded-For, but
# only on connections from these proxies (addresses or networks, comma-separated).
TRUSTED_PROXIES = envnetworks("PACSLENS_TRUSTED_PROXIES")
AXES_CLIENT_IP_CALLABLE = "pacslens.client_address.client_address"

# Production hardening, switched on by PACSLENS_HTTPS=true behind a TLS-terminating proxy.
if envbool("PACSLENS_HTTPS", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = envint("PACSLENS_HSTS_SECONDS", 31536000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = envbool("PACSLENS_HSTS_PRELOAD", False)
    if not SECURE_HSTS_PRELOAD:
        # Preloading commits the whole domain to HTTPS in every browser: the hospital network
        # team's decision, not an application default. Off on purpose, so `check --deploy`
        # need not warn about it.
        SILENCED_SYSTEM_CHECKS = ["security.W021"]

# Alerts by e-mail go through Django's SMTP backend (pacslens/ops/alerts, docs/operations.md).
EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
EMAIL_HOST = envstr("PACSLENS_EMAIL_HOST", "localhost")
EMAIL_PORT = envint("PACSLENS_EMAIL_PORT", 25, minimum=1, maximum=65535)
EMAIL_HOST_USER = envstr("PACSLENS_EMAIL_USER", "")
EMAIL_HOST_PASSWORD = envsecret("PACSLENS_EMAIL_PASSWORD", "") or ""
EMAIL_USE_TLS = envbool("PACSLENS_EMAIL_STARTTLS", False)
EMAIL_USE_SSL = envbool("PACSLENS_EMAIL_SSL", False)
if EMAIL_USE_TLS and EMAIL_USE_SSL:
    raise ImproperlyConfigured("PACSLENS_EMAIL_STARTTLS and PACSLENS_EMAIL_SSL exclude each other: choose one")
EMAIL_TIMEOUT = envint("PACSLENS_EMAIL_TIMEOUT", 10, minimum=1)
DEFAULT_FROM_EMAIL = envstr("PACSLENS_EMAIL_FROM", "pacslens@localhost")
SERVER_EMAIL = DEFAULT_FROM_EMAIL
# How alerts name this gateway (default: the host name).
ALERT_SITE_NAME = envstr("PACSLENS_ALERT_SITE_NAME", "")

# django-q2 workers. Tasks carry ids only; the database decides order (DESIGN.md).
# retry must exceed timeout plus time spent waiting in the cluster's internal queue.
Q_CLUSTER: dict[str, Any] = {
    "name": "pacslens",
    "orm": "default",
    "workers": envint("PACSLENS_WORKERS", 2, minimum=1),
    "timeout": envint("PACSLENS_TASK_TIMEOUT", 300, minimum=10),
    "retry": envint("PACSLENS_TASK_TIMEOUT", 300, minimum=10) * 3,
    "max_attempts": 2,
    "ack_failures": True,
    "save_limit": 1000,
    "catch_up": False,
    "poll": 0.2,
    "guard_cycle": 0.5,
    "label": "Django Q2",
}

LOG_LEVEL = envstr("PACSLENS_LOG_LEVEL", "INFO").upper()
# plain: one line for humans; json: JSON lines for log shippers (pacslens/logs.py).
LOG_FORMAT = envstr("PACSLENS_LOG_FORMAT", "plain").strip().lower()
if LOG_FORMAT not in ("plain", "json"):
    raise ImproperlyConfigured(f"PACSLENS_LOG_FORMAT={LOG_FORMAT!r} is not one of plain, json")
# Chatty libraries (pynetdicom, axes); tests raise it to DEBUG to prove no patient data leaks.
LOG_LIBRARY_LEVEL = envstr("PACSLENS_LOG_LIBRARY_LEVEL", "WARNING").upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "pacslens.logs.ContextFilter"}},
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(processName)s %(name)s%(context)s: %(message)s"},
        "json": {"()": "pacslens.logs.JsonFormatter"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["context"]}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # pynetdicom logs identifiers (patient name/ID) of C-FIND/C-STORE requests at INFO/DEBUG.
        "pynetdicom": {"level": LOG_LIBRARY_LEVEL},
        "django_q": {"level": envstr("PACSLENS_QUEUE_LOG_LEVEL", "WARNING").upper()},
        "axes": {"level": LOG_LIBRARY_LEVEL},  # it announces itself at INFO in every manage.py command
        "highdicom": {"level": LOG_LIBRARY_LEVEL},  # narrates every module it copies into an SR
        # dicomweb-client logs request headers (our bearer tokens) at DEBUG: never below WARNING.
        "dicomweb_client": {"level": "WARNING"},
    },
}

# /metrics answers requests from this host, or with `Authorization: Bearer <token>` when set.
METRICS_TOKEN = envsecret("PACSLENS_METRICS_TOKEN", None) or ""
