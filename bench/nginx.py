"""nginx `proxy_pass` as a reference hop: the floor any reverse proxy pays on this machine.

One process (`master_process off`, one worker's work), a keep-alive upstream pool, no logging, no
buffering to disk: what relaying an HTTP/1.1 request and its answer costs a C proxy. Not part of
the proxy or its tests; the bench skips its rows when nginx is not installed
(`apt-get install -y nginx-light`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

SEARCHED = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")


def nginx_binary() -> str | None:
    """The nginx executable (often in sbin, off a non-root PATH), or None."""
    found = shutil.which("nginx")
    if found is not None:
        return found
    return next((path for path in SEARCHED if Path(path).is_file()), None)


def nginx_config(work: Path, port: int, upstream_port: int) -> str:
    """A single-process nginx relaying every request to 127.0.0.1:upstream_port over kept-alive
    connections (HTTP/1.1, `Connection` cleared so upstream connections are reused)."""
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (work / name).mkdir(parents=True, exist_ok=True)
    return f"""
daemon off;
master_process off;
worker_processes 1;
error_log {work}/error.log warn;
pid {work}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    upstream mcp {{
        server 127.0.0.1:{upstream_port};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://mcp;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
