/*
 * embedded_pool: a manager and two workers in one C program, over mutual TLS on
 * loopback, running a few jobs and printing their events.
 *
 *   cargo build --release
 *   cargo run --release --example workpool -- generate-tls-certificates \
 *       --number-of-workers 2 --hostname localhost --output-dir certs
 *   cc -std=c11 -Wall -Wextra -Werror -I include examples/c/embedded_pool.c \
 *       target/release/libworkpool.a -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc -o embedded_pool
 *   ./embedded_pool certs
 *
 * Each side pins the other's certificate (accepted only as itself). When CERT_DIR also
 * holds ca-cert.pem, the certificates in it were issued by that CA, and both sides trust
 * the CA instead of pinning.
 *
 * It checks every result and exits non-zero on the first failure, printing why.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "workpool.h"

static void check(wp_result r, const char *what) {
    if (r != WP_RESULT_OK) {
        char msg[512];
        wp_last_error_message(msg, sizeof msg);
        fprintf(stderr, "%s failed: %s: %s\n", what, wp_result_name(r), msg);
        exit(1);
    }
}

static const char *path(const char *dir, const char *file, char *buf, size_t len) {
    snprintf(buf, len, "%s/%s", dir, file);
    return buf;
}

/* Prints a job's events until it finishes; returns its exit code (-1 if it did not exit). */
static int follow(wp_job *job) {
    for (;;) {
        wp_event ev;
        wp_result r = wp_job_next_event(job, 30000, &ev);
        if (r == WP_RESULT_TIMEOUT) {
            fprintf(stderr, "job %llu: no event in 30 s\n", (unsigned long long)wp_job_id(job));
            exit(1);
        }
        check(r, "wp_job_next_event");
        unsigned long long id = (unsigned long long)wp_job_id(job);
        switch (ev.kind) {
        case WP_EVENT_QUEUED:
            printf("job %llu queued\n", id);
            break;
        case WP_EVENT_STARTED:
            printf("job %llu started on %.*s\n", id, (int)ev.len, (const char *)ev.data);
            break;
        case WP_EVENT_OUTPUT:
            printf("job %llu %s: %.*s", id, ev.stream == WP_STREAM_STDOUT ? "stdout" : "stderr",
                   (int)ev.len, (const char *)ev.data);
            break;
        case WP_EVENT_FINISHED:
            if (ev.outcome == WP_OUTCOME_EXITED) {
                printf("job %llu finished: exited %d\n", id, ev.exit_code);
                /* After the last event, the job reports that it has ended. */
                if (wp_job_next_event(job, 0, &ev) != WP_RESULT_ENDED) {
                    fprintf(stderr, "an event after the last one\n");
                    exit(1);
                }
                return ev.exit_code;
            }
            printf("job %llu finished: outcome %u\n", id, (unsigned)ev.outcome);
            return -1;
        default:
            break;
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s CERT_DIR\n", argv[0]);
        return 2;
    }
    const char *dir = argv[1];
    char a[1024], b[1024];
    FILE *ca_file = fopen(path(dir, "ca-cert.pem", a, sizeof a), "r");
    int through_ca = ca_file != NULL;
    if (ca_file != NULL) {
        fclose(ca_file);
    }
    printf("trust: %s\n", through_ca ? "CA" : "pinned");

    wp_manager_config *mc = NULL;
    check(wp_manager_config_new(&mc), "wp_manager_config_new");
    /* Bad input is refused with a reason, and nothing is written. */
    wp_result bad = wp_manager_config_set_listen(mc, "not an address");
    char why[256];
    wp_last_error_message(why, sizeof why);
    printf("bad address: %s (%s)\n", wp_result_name(bad), why);
    check(wp_manager_config_set_listen(mc, "127.0.0.1:0"), "set_listen");
    /* Admission: a deadline for the TLS handshake and hello, a cap on handshakes in all
     * and one per source address (a newcomer over a cap displaces the oldest handshake). */
    bad = wp_manager_config_set_max_handshakes_per_source(mc, 0);
    wp_last_error_message(why, sizeof why);
    printf("zero per-source cap: %s (%s)\n", wp_result_name(bad), why);
    check(wp_manager_config_set_handshake_timeout_ms(mc, 5000), "set_handshake_timeout_ms");
    check(wp_manager_config_set_max_handshakes(mc, 64), "set_max_handshakes");
    check(wp_manager_config_set_max_handshakes_per_source(mc, 4), "set_max_handshakes_per_source");
    check(wp_manager_config_set_identity_pem_files(mc, path(dir, "host-cert.pem", a, sizeof a),
                                                   path(dir, "host-key.pem", b, sizeof b)),
          "manager identity");
    if (through_ca) {
        check(wp_manager_config_add_worker_ca_pem_file(mc, path(dir, "ca-cert.pem", a, sizeof a)), "worker CA");
    } else {
        check(wp_manager_config_add_worker_certificate_pem_file(mc, path(dir, "worker-0-cert.pem", a, sizeof a)),
              "pin worker 0");
        check(wp_manager_config_add_worker_certificate_pem_file(mc, path(dir, "worker-1-cert.pem", a, sizeof a)),
              "pin worker 1");
    }
    /* Each worker has a certificate of its own: a certificate needs few connections. */
    bad = wp_manager_config_set_max_connections_per_certificate(mc, 0);
    printf("zero connections per certificate: %s\n", wp_result_name(bad));
    check(wp_manager_config_set_max_connections_per_certificate(mc, 2), "max connections per certificate");
    wp_manager *manager = NULL;
    check(wp_manager_start(mc, &manager), "wp_manager_start");
    wp_manager_config_free(mc);
    uint16_t port = wp_manager_port(manager);
    printf("manager on port %s\n", port > 0 ? "ok" : "zero");

    wp_worker *workers[2] = {NULL, NULL};
    for (int i = 0; i < 2; i++) {
        wp_worker_config *wc = NULL;
        char name[32], cert[64], key[64];
        snprintf(name, sizeof name, "c-worker-%d", i);
        snprintf(cert, sizeof cert, "worker-%d-cert.pem", i);
        snprintf(key, sizeof key, "worker-%d-key.pem", i);
        check(wp_worker_config_new(&wc), "wp_worker_config_new");
        /* Host name verification stays on: the manager's certificate names 127.0.0.1. */
        check(wp_worker_config_set_manager(wc, "127.0.0.1", port), "set_manager");
        check(wp_worker_config_set_identity_pem_files(wc, path(dir, cert, a, sizeof a), path(dir, key, b, sizeof b)),
              "worker identity");
        if (through_ca) {
            check(wp_worker_config_add_manager_ca_pem_file(wc, path(dir, "ca-cert.pem", a, sizeof a)), "manager CA");
        } else {
            check(wp_worker_config_add_manager_certificate_pem_file(wc, path(dir, "host-cert.pem", a, sizeof a)),
                  "pin manager");
        }
        check(wp_worker_config_set_name(wc, name), "set_name");
        check(wp_worker_config_add_tag(wc, "c"), "add_tag");
        check(wp_worker_start(wc, &workers[i]), "wp_worker_start");
        wp_worker_config_free(wc);
    }

    const char *scripts[] = {
        "echo hello from job $WORKPOOL_JOB_ID",
        "echo to stderr >&2; exit 3",
        "for i in 1 2 3; do echo line $i; done",
        "printf 'no newline'",
    };
    enum { N = sizeof scripts / sizeof scripts[0] };
    wp_job *jobs[N];
    for (int i = 0; i < N; i++) {
        check(wp_manager_submit(manager, scripts[i], &jobs[i]), "wp_manager_submit");
    }
    int codes = 0;
    for (int i = 0; i < N; i++) {
        codes += follow(jobs[i]);
        printf("\n");
        wp_job_free(jobs[i]);
    }
    printf("sum of exit codes: %d\n", codes);

    wp_worker_free(workers[0]);
    wp_worker_free(workers[1]);
    wp_manager_free(manager);
    /* Freeing NULL is fine. */
    wp_manager_free(NULL);
    wp_worker_free(NULL);
    wp_job_free(NULL);
    printf("done\n");
    return 0;
}
