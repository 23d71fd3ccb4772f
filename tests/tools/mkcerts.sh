#!/usr/bin/env bash
# mkcerts.sh OUTDIR -- create the test PKI used by the smtpbridge test suites.
#
# bash + openssl only. ECDSA P-256 keys (plus one RSA-2048 proxy variant).
# Idempotent: if every output file already exists and the set was completed
# (OUTDIR/.complete), nothing is regenerated. Delete OUTDIR to start over.
#
# Files (each NAME.pem is the certificate, NAME.key the private key):
#   ca                 "smtpbridge test CA" (root)
#   other-ca           an unrelated root CA
#   proxy              server cert for the proxy's listeners
#                      SAN DNS:localhost, IP:127.0.0.1, IP:::1   (signed by ca)
#   rsa-proxy          RSA-2048 variant of proxy
#   rsa3072-proxy      RSA-3072 variant of proxy
#   upstream           SAN DNS:localhost, DNS:upstream.test, IP:127.0.0.1, IP:::1
#   upstream-wrongname SAN DNS:wrong.test only
#   upstream-expired   valid names, notAfter in the past
#   upstream-selfsigned self-signed, valid names
#   upstream-untrusted valid names, signed by other-ca
#   upstream-cnonly    CN=localhost, no SAN
#   upstream-wildcard  SAN DNS:up*.test only
#   client             client certificate (extendedKeyUsage clientAuth), signed by ca
#   rsa-client         RSA-2048 variant of client
#   sni-mail           SAN DNS:mail.sni.test                 (a second listener cert)
#   sni-wild           RSA-2048, SAN DNS:*.wild.test, DNS:rsa.sni.test
#   sni-cn             CN=cn.sni.test, no SAN
set -euo pipefail

if [ $# -ne 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi

OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

NAMES="ca other-ca proxy rsa-proxy rsa3072-proxy upstream upstream-wrongname upstream-expired
       upstream-selfsigned upstream-untrusted upstream-cnonly upstream-wildcard client
       rsa-client sni-mail sni-wild sni-cn"

complete=1
[ -f "$OUT/.complete" ] || complete=0
for n in $NAMES; do
    [ -s "$OUT/$n.pem" ] && [ -s "$OUT/$n.key" ] || complete=0
done
if [ "$complete" = 1 ]; then
    exit 0
fi

# Build everything in a scratch dir and move into place at the end, so that a
# concurrent reader never sees half-written files.
WORK=$(mktemp -d "$OUT/.mkcerts.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

DAYS=3650
SAN_VALID="DNS:localhost,DNS:upstream.test,IP:127.0.0.1,IP:::1"

eckey() {  # eckey NAME
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
        -pkeyopt ec_param_enc:named_curve -out "$1.key" 2>/dev/null
}

# ext_file NAME SAN EKU  -> writes NAME.ext (SAN may be empty)
ext_file() {
    {
        echo "basicConstraints = critical, CA:FALSE"
        echo "keyUsage = critical, digitalSignature, keyEncipherment"
        echo "extendedKeyUsage = $3"
        echo "subjectKeyIdentifier = hash"
        echo "authorityKeyIdentifier = keyid"
        if [ -n "$2" ]; then echo "subjectAltName = $2"; fi
    } >"$1.ext"
}

mkca() {  # mkca NAME CN
    eckey "$1"
    openssl req -new -x509 -key "$1.key" -out "$1.pem" -days "$DAYS" -sha256 \
        -subj "/O=smtpbridge tests/CN=$2" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" 2>/dev/null
}

# leaf NAME CN SAN ISSUER [EKU]
leaf() {
    local name=$1 cn=$2 san=$3 issuer=$4 eku=${5:-serverAuth}
    [ -f "$name.key" ] || eckey "$name"
    ext_file "$name" "$san" "$eku"
    openssl req -new -key "$name.key" -subj "/O=smtpbridge tests/CN=$cn" \
        -out "$name.csr" 2>/dev/null
    openssl x509 -req -in "$name.csr" -CA "$issuer.pem" -CAkey "$issuer.key" \
        -CAcreateserial -days "$DAYS" -sha256 -extfile "$name.ext" \
        -out "$name.pem" 2>/dev/null
}

mkca ca "smtpbridge test CA"
mkca other-ca "smtpbridge unrelated CA"

leaf proxy localhost "DNS:localhost,IP:127.0.0.1,IP:::1" ca
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out rsa-proxy.key 2>/dev/null
leaf rsa-proxy localhost "DNS:localhost,IP:127.0.0.1,IP:::1" ca
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:3072 -out rsa3072-proxy.key 2>/dev/null
leaf rsa3072-proxy localhost "DNS:localhost,IP:127.0.0.1,IP:::1" ca

leaf upstream localhost "$SAN_VALID" ca
leaf upstream-wrongname wrong.test "DNS:wrong.test" ca
leaf upstream-untrusted localhost "$SAN_VALID" other-ca
leaf upstream-cnonly localhost "" ca
leaf upstream-wildcard "up*.test" "DNS:up*.test" ca
leaf client "smtpbridge test client" "" ca clientAuth
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out rsa-client.key 2>/dev/null
leaf rsa-client "smtpbridge test client" "" ca clientAuth
leaf sni-mail mail.sni.test "DNS:mail.sni.test" ca
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sni-wild.key 2>/dev/null
leaf sni-wild wild.test "DNS:*.wild.test,DNS:rsa.sni.test" ca
leaf sni-cn cn.sni.test "" ca

# Self-signed leaf with valid names (not a CA).
eckey upstream-selfsigned
openssl req -new -x509 -key upstream-selfsigned.key -out upstream-selfsigned.pem \
    -days "$DAYS" -sha256 -subj "/O=smtpbridge tests/CN=localhost" \
    -addext "basicConstraints=critical,CA:FALSE" \
    -addext "keyUsage=critical,digitalSignature" \
    -addext "extendedKeyUsage=serverAuth" \
    -addext "subjectAltName=$SAN_VALID" 2>/dev/null

# Expired leaf: OpenSSL 3.0's `x509 -req` cannot set notBefore/notAfter, so use
# a throw-away `openssl ca` database with explicit start and end dates.
eckey upstream-expired
ext_file upstream-expired "$SAN_VALID" serverAuth
openssl req -new -key upstream-expired.key -subj "/O=smtpbridge tests/CN=localhost" \
    -out upstream-expired.csr 2>/dev/null
mkdir -p cadb/new
: >cadb/index.txt
echo 1000 >cadb/serial
cat >cadb/ca.cnf <<EOF
[ ca ]
default_ca = testca
[ testca ]
dir = $WORK/cadb
database = \$dir/index.txt
new_certs_dir = \$dir/new
serial = \$dir/serial
certificate = $WORK/ca.pem
private_key = $WORK/ca.key
default_md = sha256
policy = anything
unique_subject = no
copy_extensions = none
[ anything ]
organizationName = optional
commonName = supplied
EOF
openssl ca -batch -notext -config cadb/ca.cnf \
    -startdate 20200101000000Z -enddate 20210101000000Z \
    -extfile upstream-expired.ext -in upstream-expired.csr \
    -out upstream-expired.pem 2>/dev/null

chmod 600 ./*.key
for n in $NAMES; do
    mv -f "$n.pem" "$OUT/$n.pem"
    mv -f "$n.key" "$OUT/$n.key"
done
# Convenience bundle: leaf + CA (some servers want a full chain).
cat "$OUT/proxy.pem" "$OUT/ca.pem" >"$OUT/proxy-chain.pem"
touch "$OUT/.complete"
