#!/bin/sh
# Remakes the quotes in this folder with a software TPM (swtpm 0.7.1, libtpms) and tpm2-tools 5.4
# (Debian 12). Each run gives new keys and signatures, so tests/test_attest.py's REAL_PCRS and the
# RSA AK name must be updated from what this prints. Run in an empty scratch directory.
set -eu
here=$(pwd)
mkdir -p state
swtpm socket --tpm2 --tpmstate dir="$here/state" --server type=tcp,port=23211 --ctrl type=tcp,port=23212 \
      --flags not-need-init,startup-clear --daemon --pid file="$here/swtpm.pid"
export TPM2TOOLS_TCTI=swtpm:host=127.0.0.1,port=23211
# No resource manager between tpm2-tools and swtpm: flush transient objects after each step.
for pcr in 0 7 11; do tpm2_pcrextend "$pcr:sha256=$(printf 'fixture pcr %s' "$pcr" | sha256sum | cut -d' ' -f1)"; done
tpm2_createek -c ek.ctx -G rsa -u ek.pub
tpm2_flushcontext -t; tpm2_flushcontext -s
tpm2_createak -C ek.ctx -c ak.ctx -G ecc -g sha256 -s ecdsa -u ak-ecc.pub -n ak-ecc.name
tpm2_flushcontext -t; tpm2_flushcontext -s
tpm2_quote -c ak.ctx -l sha256:0,1,2,3,4,5,6,7,11 -g sha256 \
    -q 00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff \
    -m quote-ecc.msg -s quote-ecc.sig -o quote-ecc.pcrs -F values
tpm2_flushcontext -t
tpm2_createak -C ek.ctx -c akr.ctx -G rsa -g sha256 -s rsassa -u ak-rsa.pub -n ak-rsa.name
tpm2_flushcontext -t; tpm2_flushcontext -s
tpm2_quote -c akr.ctx -l sha256:0,1,2,3,4,5,6,7,11 -g sha256 -q cafebabe \
    -m quote-rsa.msg -s quote-rsa.sig -o quote-rsa.pcrs -F values
tpm2_flushcontext -t
tpm2_pcrread sha256:0,1,2,3,4,5,6,7,11
kill "$(cat swtpm.pid)"
