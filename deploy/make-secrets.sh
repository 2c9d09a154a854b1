#!/bin/sh
# Make, once, what the deployments in deploy/ need to run with mutual TLS and tokens:
#   deploy/make-secrets.sh OUT_DIR SERVER_NAMES CLIENT_NAMES     (comma-separated lists)
#   deploy/make-secrets.sh deploy/k8s/secrets fedpipe-server client-0,client-1
# OUT_DIR/ca/      everything `fedpipe certs` made, the CA's key included: keep it safe
# OUT_DIR/server/  ca.crt server.crt server.key health.crt health.key server.toml
# OUT_DIR/<name>/  ca.crt client.crt client.key client.token (one folder per client)
# server.toml is deploy/server.toml plus a [tokens] table of the clients' token hashes. The
# server certificate also names localhost, for the health check run next to the server; the
# "health" client certificate has no token, so it can ask for health but never join a run.
# Files are readable by their owner only; OWNER=uid:gid (when run as root) gives them to
# that user. A second run changes nothing: delete OUT_DIR to make new secrets.
set -eu

if [ "$#" -ne 3 ]; then
    echo "usage: $0 OUT_DIR SERVER_NAMES CLIENT_NAMES (comma-separated lists)" >&2
    exit 2
fi
out=$1
server_names=$2
clients=$(echo "$3" | tr ',' ' ')
base=$(dirname "$0")/server.toml

if [ -e "$out/server/server.toml" ]; then
    echo "make-secrets: $out/server/server.toml exists: keeping the secrets in $out"
    exit 0
fi
umask 077
mkdir -p "$out/server"

set --
for name in $(echo "$server_names" | tr ',' ' ') localhost; do
    set -- "$@" --server-name "$name"
done
for name in $clients health; do
    set -- "$@" --client "$name"
done
fedpipe certs --out "$out/ca" "$@" >/dev/null

cp "$out/ca/ca.crt" "$out/ca/server.crt" "$out/ca/server.key" "$out/server/"
cp "$out/ca/clients/health.crt" "$out/ca/clients/health.key" "$out/server/"
{
    cat "$base"
    printf '\n[tokens]\n'
} >"$out/server/server.toml.part"
for name in $clients; do
    mkdir -p "$out/$name"
    cp "$out/ca/ca.crt" "$out/$name/ca.crt"
    cp "$out/ca/clients/$name.crt" "$out/$name/client.crt"
    cp "$out/ca/clients/$name.key" "$out/$name/client.key"
    # 256 random bits; the server keeps only their salted hash.
    od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$out/$name/client.token"
    hash=$(fedpipe hash-token <"$out/$name/client.token")
    printf '"%s" = "%s"\n' "$name" "$hash" >>"$out/server/server.toml.part"
done
# Last: a server.toml in place means the whole set was made.
mv "$out/server/server.toml.part" "$out/server/server.toml"
if [ -n "${OWNER:-}" ]; then
    chown -R "$OWNER" "$out"
fi
echo "make-secrets: wrote $out/server/ and $out/<client>/ for:$clients"
