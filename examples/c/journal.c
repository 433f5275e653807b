/*
 * journal: a manager that keeps a journal, stopped and started again through the C API.
 * Jobs queued before the stop are queued again after it, in their order; job ids go on;
 * a second manager on a journal in use, a journal that is a folder, and bad arguments are
 * refused with their codes.
 *
 *   cargo run --release --example workpool -- generate-tls-certificates \
 *       --number-of-workers 1 --hostname localhost --output-dir certs
 *   cc -std=c11 -Wall -Wextra -Werror -I include examples/c/journal.c \
 *       target/release/libworkpool.a -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc -o journal
 *   ./journal certs
 *
 * CERT_DIR holds host-cert.pem and host-key.pem (the manager), worker-0-cert.pem and
 * worker-0-key.pem (the worker); the journal is written there as journal.sqlite. It checks
 * every result, prints what it saw (the test reads these lines), and exits non-zero on the
 * first surprise, saying why. Every wait has a deadline.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "workpool.h"

/* Generous: valgrind and sanitizers make everything slower. */
#define WAIT_S 60.0

static void check(wp_result r, const char *what) {
    if (r != WP_RESULT_OK) {
        char msg[512];
        wp_last_error_message(msg, sizeof msg);
        fprintf(stderr, "%s failed: %s: %s\n", what, wp_result_name(r), msg);
        exit(1);
    }
}

static void expect(int ok, const char *what) {
    if (!ok) {
        fprintf(stderr, "unexpected: %s\n", what);
        exit(1);
    }
}

/* Prints a refusal: its code and message. */
static void refused(const char *what, wp_result r) {
    char msg[512];
    wp_last_error_message(msg, sizeof msg);
    printf("%s: %s (%s)\n", what, wp_result_name(r), msg);
    expect(r != WP_RESULT_OK, what);
}

static const char *path(const char *dir, const char *file, char *buf, size_t len) {
    snprintf(buf, len, "%s/%s", dir, file);
    return buf;
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* A manager on `listen` with the journal at `journal`; `*out` NULL and the code returned
 * when it does not start. */
static wp_result start(const char *dir, const char *listen, const char *journal, wp_manager **out) {
    char a[1024], b[1024];
    wp_manager_config *mc = NULL;
    check(wp_manager_config_new(&mc), "wp_manager_config_new");
    check(wp_manager_config_set_listen(mc, listen), "set_listen");
    check(wp_manager_config_set_identity_pem_files(mc, path(dir, "host-cert.pem", a, sizeof a),
                                                   path(dir, "host-key.pem", b, sizeof b)),
          "identity");
    check(wp_manager_config_add_worker_certificate_pem_file(mc, path(dir, "worker-0-cert.pem", a, sizeof a)),
          "worker certificate");
    check(wp_manager_config_set_journal(mc, journal), "set_journal");
    check(wp_manager_config_set_journal_retention(mc, 3600000, 1000), "set_journal_retention");
    /* Long enough for the restart below; nothing here waits it out. */
    check(wp_manager_config_set_reconnect_grace_ms(mc, 60000), "set_reconnect_grace_ms");
    *out = NULL;
    wp_result r = wp_manager_start(mc, out);
    wp_manager_config_free(mc);
    return r;
}

/* The jobs the manager has not ended: how many, and how many of them are queued. */
static size_t jobs(const wp_manager *m, size_t *queued) {
    wp_job_list *list = NULL;
    check(wp_manager_jobs(m, &list), "wp_manager_jobs");
    size_t n = wp_job_list_len(list);
    *queued = 0;
    for (size_t i = 0; i < n; i++) {
        if (wp_job_status_state(wp_job_list_get(list, i)) == WP_JOB_STATE_QUEUED) {
            *queued += 1;
        }
    }
    wp_job_list_free(list);
    return n;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s CERT_DIR\n", argv[0]);
        return 2;
    }
    const char *dir = argv[1];
    char journal[1024], a[1024], b[1024];
    path(dir, "journal.sqlite", journal, sizeof journal);

    /* Bad arguments. */
    wp_manager_config *mc = NULL;
    check(wp_manager_config_new(&mc), "wp_manager_config_new");
    refused("empty journal path", wp_manager_config_set_journal(mc, ""));
    refused("NULL journal path", wp_manager_config_set_journal(mc, NULL));
    refused("journal retention over 365 days",
            wp_manager_config_set_journal_retention(mc, 366ull * 86400000ull, 10));
    wp_manager_config_free(mc);

    /* The first manager: two jobs queued (no worker yet). */
    wp_manager *m = NULL;
    check(start(dir, "127.0.0.1:0", journal, &m), "the first manager");
    uint16_t port = wp_manager_port(m);
    wp_job *first = NULL, *second = NULL;
    check(wp_manager_submit(m, "echo one", &first), "submit");
    check(wp_manager_submit(m, "echo two", &second), "submit");
    uint64_t last_id = wp_job_id(second);
    size_t queued = 0;
    size_t all = jobs(m, &queued);
    printf("first manager: %zu job(s), %zu queued\n", all, queued);

    /* A second manager cannot open a journal in use. */
    wp_manager *other = NULL;
    refused("a second manager on the journal", start(dir, "127.0.0.1:0", journal, &other));
    expect(other == NULL, "no second manager");
    /* Nor a folder. */
    refused("a folder as the journal", start(dir, "127.0.0.1:0", dir, &other));

    wp_stats *stats = NULL;
    wp_stats_figures f;
    check(wp_manager_stats(m, &stats), "wp_manager_stats");
    check(wp_stats_get(stats, &f), "wp_stats_get");
    printf("journal bytes: %s\n", f.journal_bytes > 0 ? "some" : "none");
    wp_stats_free(stats);
    wp_manager_free(m);
    /* The handles hear that the manager stopped; the jobs stay in the journal. */
    wp_job_free(first);
    wp_job_free(second);

    /* Started again on the same port and journal. */
    char listen[64];
    snprintf(listen, sizeof listen, "127.0.0.1:%u", (unsigned)port);
    check(start(dir, listen, journal, &m), "the manager started again");
    all = jobs(m, &queued);
    printf("after the restart: %zu job(s), %zu queued\n", all, queued);
    wp_job *third = NULL;
    check(wp_manager_submit(m, "echo three", &third), "submit");
    printf("ids go on: %s\n", wp_job_id(third) > last_id ? "yes" : "no");

    wp_worker_config *wc = NULL;
    check(wp_worker_config_new(&wc), "wp_worker_config_new");
    check(wp_worker_config_set_manager(wc, "127.0.0.1", port), "set_manager");
    check(wp_worker_config_set_identity_pem_files(wc, path(dir, "worker-0-cert.pem", a, sizeof a),
                                                  path(dir, "worker-0-key.pem", b, sizeof b)),
          "worker identity");
    check(wp_worker_config_add_manager_certificate_pem_file(wc, path(dir, "host-cert.pem", a, sizeof a)),
          "manager certificate");
    check(wp_worker_config_set_name(wc, "c-journal-worker"), "set_name");
    wp_worker *w = NULL;
    check(wp_worker_start(wc, &w), "wp_worker_start");
    wp_worker_config_free(wc);

    wp_job_result *result = NULL;
    check(wp_job_wait_timeout(third, 60000, &result), "wp_job_wait_timeout");
    wp_job_result_free(result);
    wp_job_free(third);
    double deadline = now_s() + WAIT_S;
    while (jobs(m, &queued) > 0) {
        expect(now_s() < deadline, "the restored jobs end within the deadline");
        struct timespec t = {0, 20 * 1000 * 1000};
        nanosleep(&t, NULL);
    }
    check(wp_manager_stats(m, &stats), "wp_manager_stats");
    check(wp_stats_get(stats, &f), "wp_stats_get");
    printf("jobs that exited after the restart: %llu\n", (unsigned long long)f.jobs_exited);
    wp_stats_free(stats);
    wp_worker_free(w);
    wp_manager_free(m);
    printf("done\n");
    return 0;
}
