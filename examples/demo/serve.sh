#!/bin/sh
# A pod's web server for the demo: nginx in the foreground with every path under $POD_DIR (the
# sim's per-pod directory), answering every request with who it is and who called it.
set -eu
: "${POD_DIR:?run by scripts/sim}"
mkdir -p "$POD_DIR/tmp"
cat > "$POD_DIR/nginx.conf" <<CONF
daemon off;
worker_processes 1;
pid $POD_DIR/nginx.pid;
error_log $POD_DIR/nginx-error.log warn;
events { worker_connections 512; }
http {
  access_log $POD_DIR/access.log;
  client_body_temp_path $POD_DIR/tmp/body;
  proxy_temp_path $POD_DIR/tmp/proxy;
  fastcgi_temp_path $POD_DIR/tmp/fastcgi;
  uwsgi_temp_path $POD_DIR/tmp/uwsgi;
  scgi_temp_path $POD_DIR/tmp/scgi;
  server {
    listen 80;
    listen [::]:80;
    location / {
      default_type text/plain;
      return 200 "server=$POD_NAMESPACE/$POD_NAME client=\$remote_addr\n";
    }
  }
}
CONF
exec nginx -e "$POD_DIR/nginx-error.log" -c "$POD_DIR/nginx.conf"
