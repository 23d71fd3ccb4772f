/*
 * fuzz_config.c - libFuzzer target: config_parse_string on the input (made
 * NUL-terminated), then config_dump and config_free on an accepted config.
 * ASan/UBSan find the bugs; the parser's error messages go to /dev/null.
 *
 * clang -g -O1 -fsanitize=fuzzer,address,undefined -Iproxy \
 *       tests/fuzz/fuzz_config.c proxy/config.c proxy/log.c -linih \
 *       -o build/fuzz/fuzz_config
 *
 * File names in the input are real paths: an accepted config needs readable
 * cert/key files (the seed corpus uses /etc/hostname and /etc/passwd).
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static FILE *devnull;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text;
    struct config *cfg;

    if (devnull == NULL) {
        /* Once: open the dump sink, and silence the parser's error output.
         * Not freopen(stderr): that would also send libFuzzer's own output
         * (final stats, which run.sh reads) and sanitizer reports on fd 2 to
         * /dev/null. libFuzzer keeps the FILE * it saw at start-up, and glibc
         * documents stderr as an ordinary assignable variable, so pointing
         * the variable elsewhere silences only config.c. */
        devnull = fopen("/dev/null", "w");
        if (devnull == NULL)
            abort();
        stderr = devnull;
    }
    text = malloc(size + 1);
    if (text == NULL)
        return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    cfg = config_parse_string(text, "fuzz.conf");
    if (cfg != NULL) {
        if (cfg->nupstreams == 0 || cfg->nlisteners == 0 || cfg->hostname == NULL)
            abort(); /* config.h: a returned config is complete */
        for (size_t i = 0; i < cfg->nlisteners; i++)
            if (cfg->listeners[i].upstream == NULL || cfg->listeners[i].nlisten == 0)
                abort();
        config_dump(cfg, devnull);
        fflush(devnull);
    }
    config_free(cfg);
    free(text);
    return 0;
}
