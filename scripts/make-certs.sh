#!/usr/bin/env bash
# Makes what the filter's wss:// intake needs, the way TLS clients accept it: a private CA, and a
# server certificate signed by that CA (basicConstraints CA:FALSE, serverAuth) for the hosts
# given. A self-signed `openssl req -x509` certificate is a CA certificate, which TLS clients
# refuse as a server's own.
#
#   scripts/make-certs.sh DIR [HOST ...]     (hosts default to: localhost 127.0.0.1 filter)
#
# Writes DIR/ca.pem (trust it: FILTER_CA_FILE), DIR/server.pem and DIR/server-key.pem (serve
# them: FILTER_TLS_CERT, FILTER_TLS_KEY) and DIR/ca-key.pem (keep it, or delete it once done).
# Existing files are not overwritten.
set -euo pipefail

dir=${1:?usage: scripts/make-certs.sh DIR [HOST ...]}
shift
hosts=("$@")
[ ${#hosts[@]} -gt 0 ] || hosts=(localhost 127.0.0.1 filter)
command -v openssl >/dev/null || { echo "make-certs: openssl is needed (apt-get install openssl)" >&2; exit 1; }

mkdir -p "$dir"
for file in ca.pem ca-key.pem server.pem server-key.pem; do
  if [ -e "$dir/$file" ]; then
    echo "make-certs: $dir/$file exists; not overwriting (use another directory)" >&2
    exit 1
  fi
done

san=""
for host in "${hosts[@]}"; do
  if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then san+="IP:$host,"; else san+="DNS:$host,"; fi
done
san=${san%,}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umask 077
openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=flowmesh private CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$dir/ca-key.pem" -out "$dir/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=${hosts[0]}" \
  -keyout "$dir/server-key.pem" -out "$work/server.csr" 2>/dev/null
printf '%s\n' "basicConstraints=critical,CA:FALSE" \
  "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" \
  "subjectAltName=$san" >"$work/server.ext"
openssl x509 -req -in "$work/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca-key.pem" \
  -CAserial "$work/ca.srl" -CAcreateserial -days 825 -extfile "$work/server.ext" \
  -out "$dir/server.pem" 2>/dev/null
chmod 644 "$dir/ca.pem" "$dir/server.pem"
echo "make-certs: $dir/server.pem for $san, signed by $dir/ca.pem" >&2
