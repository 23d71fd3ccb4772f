# smtpbridge - see README.md.
#
#   make                 build build/smtpbridge
#   make run             install what is missing, build, start a demo (see README)
#   make test            install what is missing, build, run every test
#   make install         install binary, config and docs under $(PREFIX)
#   make SANITIZER=address   ASan+UBSan build in build/asan/
#   make WOLFSSL=system  link Debian's libwolfssl instead of our own build
#   make format          reformat the C sources (make format-check checks)

CC        ?= cc
CFLAGS    ?= -O2 -g
WARN      := -Wall -Wextra -Werror -Wshadow -Wconversion -Wstrict-prototypes -Wmissing-prototypes
CPPFLAGS  += -D_GNU_SOURCE -Iproxy
STD       := -std=c17
PREFIX    ?= /usr/local
DESTDIR   ?=
PYTHON    := /usr/bin/python3
VERSION   := 0.1.0

# TLS library: "static" (default) is Debian's wolfssl source package built by
# scripts/wolfssl.sh with x86-64 assembly and a lean feature set, cached in
# build/wolfssl; "system" links Debian's packaged libwolfssl (no assembly,
# no TLS 1.0) as a fallback.
WOLFSSL   ?= static
WOLFSSL_DIR := build/wolfssl
ifeq ($(WOLFSSL),static)
  SUFFIX  :=
  WOLF_INC := -I$(WOLFSSL_DIR)/include -DSMTPBRIDGE_OWN_WOLFSSL=1
  WOLF_LIB := $(WOLFSSL_DIR)/lib/libwolfssl.a -lm -lpthread
  WOLF_DEP := $(WOLFSSL_DIR)/lib/libwolfssl.a
else ifeq ($(WOLFSSL),system)
  SUFFIX  := -system
  WOLF_INC :=
  WOLF_LIB := -lwolfssl
  WOLF_DEP :=
else
  $(error WOLFSSL must be 'static' or 'system')
endif
LIBS      := $(WOLF_LIB) -lcrypto -lev -linih

ifeq ($(SANITIZER),)
  BUILD   := build$(SUFFIX)
else ifeq ($(SANITIZER),address)
  BUILD   := build/asan$(SUFFIX)
  CFLAGS  := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
  LDFLAGS += -fsanitize=address,undefined
else
  $(error SANITIZER must be empty or 'address')
endif

SRCS := $(wildcard proxy/*.c)
OBJS := $(patsubst proxy/%.c,$(BUILD)/obj/%.o,$(SRCS))
BIN  := $(BUILD)/smtpbridge

.PHONY: all deps deps-build run test test-unit test-integration test-asan test-fuzz fuzz format \
        format-check install clean bench

all: deps-build $(BIN)

deps-build:
	@scripts/deps.sh build

# Order-only on deps-build: under make -j the compiler must not start
# before the -dev packages it includes are installed (with WOLFSSL=system no
# library build stands in between), nor may two steps run apt-get at once.
$(BUILD)/obj/%.o: proxy/%.c $(wildcard proxy/*.h) $(WOLF_DEP) | $(BUILD)/obj deps-build
	$(CC) $(STD) $(CFLAGS) $(WARN) $(CPPFLAGS) $(WOLF_INC) -DSMTPBRIDGE_VERSION='"$(VERSION)"' -c $< -o $@

# (order-only on deps-build too: wolfssl.sh runs apt-get for its build tools)
$(WOLFSSL_DIR)/lib/libwolfssl.a: scripts/wolfssl.sh $(wildcard scripts/wolfssl-patches/*.patch) | deps-build
	scripts/wolfssl.sh $(WOLFSSL_DIR)

$(BIN): $(OBJS)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $(OBJS) $(LIBS)

$(BUILD)/obj:
	mkdir -p $@

# ---- running ----

run:
	@scripts/deps.sh run
	@$(MAKE) --no-print-directory all
	@SMTPBRIDGE_BIN=$(CURDIR)/$(BIN) scripts/run-demo.sh

install: all
	id smtpbridge >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin smtpbridge
	install -d $(DESTDIR)$(PREFIX)/sbin $(DESTDIR)/etc/smtpbridge $(DESTDIR)$(PREFIX)/share/doc/smtpbridge
	install -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/sbin/smtpbridge
	[ -e $(DESTDIR)/etc/smtpbridge/smtpbridge.conf ] || \
	  install -m 0644 config/smtpbridge.conf $(DESTDIR)/etc/smtpbridge/smtpbridge.conf
	install -m 0644 README.md docs/*.md config/fail2ban-filter.conf $(DESTDIR)$(PREFIX)/share/doc/smtpbridge/
	install -d $(DESTDIR)/etc/systemd/system
	sed 's|/usr/local/sbin|$(PREFIX)/sbin|g' config/smtpbridge.service > $(DESTDIR)/etc/systemd/system/smtpbridge.service

# ---- tests ----

UNIT_TESTS := $(patsubst tests/unit/%.c,build/unit/%,$(wildcard tests/unit/test_*.c))

build/unit/test_smtp: tests/unit/test_smtp.c tests/unit/check.h proxy/smtp.c proxy/smtp.h
	@mkdir -p build/unit
	$(CC) $(STD) -O1 -g $(WARN) $(CPPFLAGS) -fsanitize=address,undefined -fno-sanitize-recover=all \
	  tests/unit/test_smtp.c proxy/smtp.c -o $@

build/unit/test_config: tests/unit/test_config.c tests/unit/check.h proxy/config.c proxy/log.c proxy/config.h
	@mkdir -p build/unit
	$(CC) $(STD) -O1 -g $(WARN) $(CPPFLAGS) -fsanitize=address,undefined -fno-sanitize-recover=all \
	  tests/unit/test_config.c proxy/config.c proxy/log.c -linih -o $@

build/unit/test_proxyproto: tests/unit/test_proxyproto.c tests/unit/check.h proxy/proxyproto.c proxy/smtp.c proxy/proxyproto.h
	@mkdir -p build/unit
	$(CC) $(STD) -O1 -g $(WARN) $(CPPFLAGS) -fsanitize=address,undefined -fno-sanitize-recover=all \
	  tests/unit/test_proxyproto.c proxy/proxyproto.c proxy/smtp.c -o $@

# The project's wolfSSL build against OpenSSL (its SHA-NI patch, 0004).
build/unit/test_sha256: tests/unit/test_sha256.c tests/unit/check.h $(WOLFSSL_DIR)/lib/libwolfssl.a
	@mkdir -p build/unit
	$(CC) $(STD) -O1 -g $(WARN) $(CPPFLAGS) -I$(WOLFSSL_DIR)/include -fsanitize=address,undefined \
	  -fno-sanitize-recover=all tests/unit/test_sha256.c $(WOLFSSL_DIR)/lib/libwolfssl.a -lcrypto \
	  -lm -lpthread -o $@

# The crypto device's parts (cryptodev.c), which the two tests below link.
CRYPTODEV_SRCS := proxy/cryptodev.c proxy/gcm_vaes.c proxy/rsa_backend.c proxy/metrics.c proxy/log.c

# proxy/rsa_backend.c against wolfSSL's own RSA (needs both libraries).
build/unit/test_rsa_backend: tests/unit/test_rsa_backend.c tests/unit/check.h tests/unit/metric.h $(CRYPTODEV_SRCS) \
  proxy/rsa_backend.h proxy/cryptodev.h $(WOLFSSL_DIR)/lib/libwolfssl.a
	@mkdir -p build/unit
	$(CC) $(STD) -O1 -g $(WARN) $(CPPFLAGS) -I$(WOLFSSL_DIR)/include -fsanitize=address,undefined \
	  -fno-sanitize-recover=all tests/unit/test_rsa_backend.c $(CRYPTODEV_SRCS) \
	  $(WOLFSSL_DIR)/lib/libwolfssl.a -lcrypto -lm -lpthread -o $@

# proxy/gcm_vaes.c against wolfSSL's AES-GCM, directly and through the
# crypto device.
build/unit/test_gcm_vaes: tests/unit/test_gcm_vaes.c tests/unit/check.h tests/unit/metric.h $(CRYPTODEV_SRCS) \
  proxy/gcm_vaes.h proxy/cryptodev.h $(WOLFSSL_DIR)/lib/libwolfssl.a
	@mkdir -p build/unit
	$(CC) $(STD) -O1 -g $(WARN) $(CPPFLAGS) -I$(WOLFSSL_DIR)/include -fsanitize=address,undefined \
	  -fno-sanitize-recover=all tests/unit/test_gcm_vaes.c $(CRYPTODEV_SRCS) \
	  $(WOLFSSL_DIR)/lib/libwolfssl.a -lcrypto -lm -lpthread -o $@

# test_apt.sh: scripts/apt.sh (the apt calls of deps.sh and wolfssl.sh)
# against a stand-in apt-get.
test-unit: $(UNIT_TESTS)
	@set -e; for t in $(UNIT_TESTS) tests/unit/test_apt.sh; do echo "== $$t"; $$t; done

test-integration: all
	SMTPBRIDGE_BIN=$(CURDIR)/$(BIN) $(PYTHON) -m pytest -q tests/integration

# The whole integration suite against Debian's packaged wolfSSL as well.
test-system:
	@$(MAKE) --no-print-directory WOLFSSL=system all
	SMTPBRIDGE_BIN=$(CURDIR)/build-system/smtpbridge SMTPBRIDGE_MAX_SESSION_KB=192 \
	  $(PYTHON) -m pytest -q tests/integration

test-asan:
	@$(MAKE) --no-print-directory SANITIZER=address all
	SMTPBRIDGE_BIN=$(CURDIR)/build/asan$(SUFFIX)/smtpbridge ASAN_OPTIONS=detect_leaks=1 \
	  SMTPBRIDGE_TIME_FACTOR=2 SMTPBRIDGE_MAX_RSS_MB=0 \
	  UBSAN_OPTIONS=print_stacktrace=1 $(PYTHON) -m pytest -q tests/integration

FUZZ_SECONDS ?= 45
test-fuzz: $(WOLFSSL_DIR)/lib/libwolfssl.a
	tests/fuzz/run.sh $(FUZZ_SECONDS)

fuzz: $(WOLFSSL_DIR)/lib/libwolfssl.a
	tests/fuzz/run.sh 600

format:
	clang-format -i proxy/*.c proxy/*.h tests/unit/*.c tests/unit/*.h tests/fuzz/*.c tests/bench/*.c

format-check:
	@clang-format --dry-run --Werror proxy/*.c proxy/*.h tests/unit/*.c tests/unit/*.h tests/fuzz/*.c tests/bench/*.c \
	  && echo "format-check: OK"

test:
	@scripts/deps.sh test
	@$(MAKE) --no-print-directory all
	@$(MAKE) --no-print-directory format-check
	@$(MAKE) --no-print-directory test-unit
	@$(MAKE) --no-print-directory test-integration
	@$(MAKE) --no-print-directory test-e2e
	@$(MAKE) --no-print-directory test-asan
	@$(MAKE) --no-print-directory test-valgrind
	@$(MAKE) --no-print-directory test-fuzz
	@$(MAKE) --no-print-directory test-system

clean:
	rm -rf build build-system

bench: all
	@tests/bench/run.sh

# ---- deployment tier (docker/, tests/e2e/, tests/docker/; docs/deploy.md) ----

.PHONY: test-e2e test-docker

# A private Postfix (STARTTLS + Dovecot SASL) on loopback in front of which the
# daemon is tested with real clients; installs postfix/dovecot-core if missing.
test-e2e: all
	SMTPBRIDGE_BIN=$(CURDIR)/$(BIN) $(PYTHON) -m pytest -q tests/e2e

# Builds docker/Dockerfile (and docker/postfix) with podman and tests the
# images from their own file systems. Not part of `make test` (slow first run).
test-docker:
	tests/docker/test_image.sh

# ---- valgrind ----
# memcheck over a representative part of the integration suite (the daemon
# runs under SMTPBRIDGE_WRAPPER; a test fails on valgrind's error exit 99 or
# on any "definitely lost" / "Invalid read|write" report in its stderr).
# Zero errors and zero definite leaks are required.
.PHONY: test-valgrind
VALGRIND ?= valgrind --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite --track-fds=no -q
VALGRIND_TESTS ?= rsa_backend or aes_gcm or alert_is_named or smtplib or swaks or injection or auth_gate or bad_greeting or ehlo_without_starttls or bytes_after_starttls or bad_certificate or healthy_starttls_upstream or probe_in_flight or response_is_stapled or hello_arriving_in_pieces or first_address_refused or client_session_resumption or many_records_in_one_write or half_close_after_upload
test-valgrind: all
	SMTPBRIDGE_BIN=$(CURDIR)/$(BIN) SMTPBRIDGE_WRAPPER="$(VALGRIND)" \
	  SMTPBRIDGE_TIME_FACTOR=20 SMTPBRIDGE_MAX_RSS_MB=0 \
	  $(PYTHON) -m pytest -q -p no:cacheprovider tests/integration -k "$(VALGRIND_TESTS)"
