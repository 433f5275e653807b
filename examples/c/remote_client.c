/*
 * remote_client: submitting from another process or machine, through the C API. A manager
 * and a worker run in this process (as they would elsewhere), and a client connects to the
 * manager over mutual TLS with a submitter certificate: it submits jobs and reads their
 * events and results through the same wp_job functions as a local job, submits an array,
 * lists jobs and workers, reads the figures, cancels, closes, and attaches from a second
 * client to a detached job of the first.
 *
 *   cargo run --release --example workpool -- generate-tls-certificates \
 *       --number-of-workers 1 --number-of-submitters 1 --hostname localhost --output-dir certs
 *   cc -std=c11 -Wall -Wextra -Werror -I include examples/c/remote_client.c \
 *       target/release/libworkpool.a -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc -o remote_client
 *   ./remote_client certs
 *
 * CERT_DIR holds host-cert.pem and host-key.pem (the manager), worker-0-cert.pem and
 * worker-0-key.pem (the worker), submitter-1-cert.pem and submitter-1-key.pem (the client).
 * It checks every result, prints what it saw (the test reads these lines), and exits
 * non-zero on the first surprise, saying why. Every wait has a deadline.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "workpool.h"

/* Generous: valgrind and sanitizers make everything slower. */
#define WAIT_MS 60000u

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
    char msg[256];
    wp_last_error_message(msg, sizeof msg);
    printf("%s: %s (%s)\n", what, wp_result_name(r), msg);
    expect(r != WP_RESULT_OK, what);
}

static const char *outcome_name(wp_outcome o) {
    switch (o) {
    case WP_OUTCOME_NONE: return "none";
    case WP_OUTCOME_EXITED: return "exited";
    case WP_OUTCOME_SIGNALED: return "signaled";
    case WP_OUTCOME_TIMED_OUT: return "timed_out";
    case WP_OUTCOME_CANCELLED: return "cancelled";
    case WP_OUTCOME_WORKER_LOST: return "worker_lost";
    case WP_OUTCOME_REJECTED: return "rejected";
    case WP_OUTCOME_SPAWN_FAILED: return "spawn_failed";
    default: return "unknown";
    }
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

/* Whether `bytes` holds exactly the text `want`. */
static int same(wp_bytes bytes, const char *want) {
    size_t n = strlen(want);
    return bytes.len == n && (n == 0 || memcmp(bytes.data, want, n) == 0);
}

/* Reads a job's events until one of `kind` comes; returns it (its data lives in the job). */
static wp_event await_job_event(wp_job *job, wp_event_kind kind) {
    double deadline = now_s() + WAIT_MS / 1000.0;
    while (now_s() < deadline) {
        wp_event ev;
        wp_result r = wp_job_next_event(job, 1000, &ev);
        if (r == WP_RESULT_TIMEOUT) {
            continue;
        }
        check(r, "wp_job_next_event");
        if (ev.kind == kind) {
            return ev;
        }
        expect(ev.kind != WP_EVENT_FINISHED, "the job ended before the awaited event");
    }
    fprintf(stderr, "job %llu: no event %u in time\n", (unsigned long long)wp_job_id(job), (unsigned)kind);
    exit(1);
}

static wp_job_result *wait_result(wp_job *job) {
    wp_job_result *result = NULL;
    check(wp_job_wait_timeout(job, WAIT_MS, &result), "wp_job_wait_timeout");
    return result;
}

/* A client configuration for the manager on `port`, with the identity in CERT/KEY. */
static wp_client_config *client_config(const char *dir, uint16_t port, const char *cert, const char *key) {
    char a[1024], b[1024];
    wp_client_config *cc = NULL;
    check(wp_client_config_new(&cc), "wp_client_config_new");
    check(wp_client_config_set_manager(cc, "127.0.0.1", port), "client set_manager");
    check(wp_client_config_set_identity_pem_files(cc, path(dir, cert, a, sizeof a), path(dir, key, b, sizeof b)),
          "client identity");
    check(wp_client_config_add_manager_certificate_pem_file(cc, path(dir, "host-cert.pem", a, sizeof a)),
          "client pins the manager");
    check(wp_client_config_set_verify_hostname(cc, true), "client set_verify_hostname");
    check(wp_client_config_set_connect_timeout_ms(cc, 10000), "client set_connect_timeout_ms");
    check(wp_client_config_set_backoff_initial_ms(cc, 20), "client set_backoff_initial_ms");
    check(wp_client_config_set_backoff_max_ms(cc, 300), "client set_backoff_max_ms");
    check(wp_client_config_set_reconnect_grace_ms(cc, 5000), "client set_reconnect_grace_ms");
    check(wp_client_config_set_result_output_limit(cc, 1 << 20), "client set_result_output_limit");
    return cc;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s CERT_DIR\n", argv[0]);
        return 2;
    }
    const char *dir = argv[1];
    char a[1024], b[1024];
    /* Line by line, so that what was printed is seen even when a check ends the process. */
    setvbuf(stdout, NULL, _IOLBF, 0);

    /* Bad client settings are refused with a reason, the configuration kept as it was. */
    {
        wp_client_config *cc = NULL;
        wp_client *none = NULL;
        check(wp_client_config_new(&cc), "wp_client_config_new");
        refused("client without a manager", wp_client_connect(cc, &none));
        expect(none == NULL, "a failed connect writes no client");
        refused("empty manager host", wp_client_config_set_manager(cc, "", 9001));
        refused("client name with a newline", wp_client_config_set_name(cc, "a\nb"));
        refused("zero connect timeout", wp_client_config_set_connect_timeout_ms(cc, 0));
        refused("zero first backoff", wp_client_config_set_backoff_initial_ms(cc, 0));
        refused("reconnect grace over 365 days", wp_client_config_set_reconnect_grace_ms(cc, 366ULL * 86400 * 1000));
        refused("missing manager CA", wp_client_config_add_manager_ca_pem_file(cc, "/nonexistent/ca.pem"));
        wp_client_config_free(cc);
    }

    /* The manager trusts worker 0 as a worker and submitter 1 as a submitter. */
    wp_manager_config *mc = NULL;
    check(wp_manager_config_new(&mc), "wp_manager_config_new");
    check(wp_manager_config_set_listen(mc, "127.0.0.1:0"), "set_listen");
    check(wp_manager_config_set_identity_pem_files(mc, path(dir, "host-cert.pem", a, sizeof a),
                                                   path(dir, "host-key.pem", b, sizeof b)),
          "manager identity");
    check(wp_manager_config_add_worker_certificate_pem_file(mc, path(dir, "worker-0-cert.pem", a, sizeof a)),
          "pin the worker");
    check(wp_manager_config_add_submitter_certificate_pem_file(mc, path(dir, "submitter-1-cert.pem", a, sizeof a)),
          "pin the submitter");
    check(wp_manager_config_set_shutdown_grace_ms(mc, 0), "set_shutdown_grace_ms");
    wp_manager *manager = NULL;
    check(wp_manager_start(mc, &manager), "wp_manager_start");
    wp_manager_config_free(mc);
    uint16_t port = wp_manager_port(manager);

    wp_worker_config *wc = NULL;
    check(wp_worker_config_new(&wc), "wp_worker_config_new");
    check(wp_worker_config_set_manager(wc, "127.0.0.1", port), "worker set_manager");
    check(wp_worker_config_set_identity_pem_files(wc, path(dir, "worker-0-cert.pem", a, sizeof a),
                                                  path(dir, "worker-0-key.pem", b, sizeof b)),
          "worker identity");
    check(wp_worker_config_add_manager_certificate_pem_file(wc, path(dir, "host-cert.pem", a, sizeof a)),
          "worker pins the manager");
    check(wp_worker_config_set_name(wc, "c-remote-worker"), "worker set_name");
    check(wp_worker_config_set_slots(wc, 4), "worker set_slots");
    check(wp_worker_config_set_kill_grace_ms(wc, 1000), "worker set_kill_grace_ms");
    check(wp_worker_config_set_backoff_initial_ms(wc, 20), "worker set_backoff_initial_ms");
    wp_worker *worker = NULL;
    check(wp_worker_start(wc, &worker), "wp_worker_start");
    wp_worker_config_free(wc);

    /* A worker certificate cannot submit: the manager refuses it and says why. */
    {
        wp_client_config *cc = client_config(dir, port, "worker-0-cert.pem", "worker-0-key.pem");
        wp_client *none = NULL;
        wp_result r = wp_client_connect(cc, &none);
        char msg[512];
        wp_last_error_message(msg, sizeof msg);
        printf("worker certificate as a submitter: %s, says why: %s\n", wp_result_name(r),
               strstr(msg, "submit") != NULL ? "yes" : msg);
        expect(r != WP_RESULT_OK && none == NULL, "a worker certificate is refused as a submitter");
        wp_client_config_free(cc);
    }

    wp_client_config *cc = client_config(dir, port, "submitter-1-cert.pem", "submitter-1-key.pem");
    check(wp_client_config_set_name(cc, "c-remote-client"), "client set_name");
    wp_client *client = NULL;
    check(wp_client_connect(cc, &client), "wp_client_connect");
    printf("client %s: connected %d\n", wp_client_name(client), (int)wp_client_is_connected(client));

    /* A job that writes to both streams and exits 7, read event by event. */
    wp_job_spec *spec = NULL;
    check(wp_job_spec_new("printf out; printf err >&2; exit 7", &spec), "wp_job_spec_new");
    wp_job *job = NULL;
    check(wp_client_submit_spec(client, spec, &job), "wp_client_submit_spec");
    wp_job_spec_free(spec);
    {
        char out[64] = "", err[64] = "", on[64] = "";
        double deadline = now_s() + WAIT_MS / 1000.0;
        wp_event ev;
        for (;;) {
            expect(now_s() < deadline, "the job ends in time");
            wp_result r = wp_job_next_event(job, 1000, &ev);
            if (r == WP_RESULT_TIMEOUT) {
                continue;
            }
            check(r, "wp_job_next_event");
            if (ev.kind == WP_EVENT_STARTED) {
                snprintf(on, sizeof on, "%.*s", (int)ev.len, (const char *)ev.data);
            } else if (ev.kind == WP_EVENT_OUTPUT) {
                char *to = ev.stream == WP_STREAM_STDOUT ? out : err;
                strncat(to, (const char *)ev.data, ev.len < 32 ? ev.len : 32);
            } else if (ev.kind == WP_EVENT_FINISHED) {
                break;
            }
        }
        printf("remote job events: started on %s, stdout \"%s\", stderr \"%s\", %s %d\n", on, out, err,
               outcome_name(ev.outcome), ev.exit_code);
        wp_job_result *none = NULL;
        refused("wait after the last event", wp_job_wait(job, &none));
        expect(none == NULL, "no result after the end");
    }
    wp_job_free(job);

    /* The same script as a bare one, its result read at once. */
    check(wp_client_submit(client, "printf out; printf err >&2; exit 7", &job), "wp_client_submit");
    {
        wp_job_result *result = wait_result(job);
        expect(wp_job_result_id(result) == wp_job_id(job), "the result's id is the job's");
        printf("remote job result: %s %d, stdout %s, stderr %s, on %s\n", outcome_name(wp_job_result_outcome(result)),
               wp_job_result_exit_code(result), same(wp_job_result_stdout(result), "out") ? "out" : "?",
               same(wp_job_result_stderr(result), "err") ? "err" : "?", wp_job_result_worker(result));
        wp_job_result_free(result);
    }
    wp_job_free(job);

    /* An array of 3: each job gets its index. A bad range or a wrong length is refused. */
    check(wp_job_spec_new("printf 'index %s' \"$WORKPOOL_ARRAY_INDEX\"", &spec), "wp_job_spec_new");
    wp_job *array[3] = {NULL, NULL, NULL};
    refused("array first after last", wp_client_submit_array(client, spec, 3, 1, array, 3));
    refused("array out too short", wp_client_submit_array(client, spec, 1, 3, array, 2));
    expect(array[0] == NULL && array[1] == NULL && array[2] == NULL, "a refused array writes no job");
    check(wp_client_submit_array(client, spec, 1, 3, array, 3), "wp_client_submit_array");
    wp_job_spec_free(spec);
    expect(wp_job_id(array[0]) != wp_job_id(array[1]) && wp_job_id(array[1]) != wp_job_id(array[2]) &&
               wp_job_id(array[0]) != wp_job_id(array[2]),
           "each array job has its own id");
    for (int i = 0; i < 3; i++) {
        wp_job_result *result = wait_result(array[i]);
        char want[32];
        snprintf(want, sizeof want, "index %d", i + 1);
        printf("array job %d: %s %d, %s\n", i, outcome_name(wp_job_result_outcome(result)),
               wp_job_result_exit_code(result), same(wp_job_result_stdout(result), want) ? want : "wrong index");
        if (wp_job_result_reason(result) != NULL) {
            printf("array job %d: %s\n", i, wp_job_result_reason(result));
        }
        wp_job_result_free(result);
        wp_job_free(array[i]);
    }

    /* A sleeping job: seen in the lists, then cancelled by id. */
    check(wp_client_submit(client, "sleep 600", &job), "submit sleep");
    await_job_event(job, WP_EVENT_STARTED);
    uint64_t id = wp_job_id(job);
    {
        wp_job_status *status = NULL;
        check(wp_client_job(client, id, &status), "wp_client_job");
        printf("remote status: running %d, on %s, script %s\n", wp_job_status_state(status) == WP_JOB_STATE_RUNNING,
               wp_job_status_worker(status), wp_job_status_script(status));
        wp_job_status_free(status);
        wp_job_list *jobs = NULL;
        check(wp_client_jobs(client, &jobs), "wp_client_jobs");
        int listed = 0;
        for (size_t i = 0; i < wp_job_list_len(jobs); i++) {
            listed += wp_job_status_id(wp_job_list_get(jobs, i)) == id;
        }
        printf("remote jobs: %zu, the sleeping one listed: %d\n", wp_job_list_len(jobs), listed);
        wp_job_list_free(jobs);
        wp_worker_list *workers = NULL;
        check(wp_client_workers(client, &workers), "wp_client_workers");
        expect(wp_worker_list_len(workers) == 1, "one worker");
        const wp_worker_info *w = wp_worker_list_get(workers, 0);
        printf("remote workers: %zu, %s with %u slots running %zu\n", wp_worker_list_len(workers),
               wp_worker_info_name(w), wp_worker_info_slots(w), wp_worker_info_running(w));
        wp_worker_list_free(workers);
        wp_stats *stats = NULL;
        check(wp_client_stats(client, &stats), "wp_client_stats");
        wp_stats_figures f;
        check(wp_stats_get(stats, &f), "wp_stats_get");
        printf("remote stats: workers %zu, submitted %llu, running %zu, exited %llu\n", f.workers,
               (unsigned long long)f.jobs_submitted, f.jobs_running, (unsigned long long)f.jobs_exited);
        wp_stats_free(stats);
    }
    check(wp_client_cancel(client, id), "wp_client_cancel");
    {
        wp_event ev = await_job_event(job, WP_EVENT_FINISHED);
        printf("cancelled by id: %s\n", outcome_name(ev.outcome));
    }
    wp_job_free(job);
    refused("cancel an ended job", wp_client_cancel(client, id));
    {
        wp_job_status *status = NULL;
        refused("status of an ended job", wp_client_job(client, id, &status));
        expect(status == NULL, "no status for an ended job");
    }
    refused("attach to no such job", wp_client_attach(client, 999999, &job));

    /* A remote job cancelled through its own handle. */
    check(wp_client_submit(client, "sleep 600", &job), "submit sleep");
    await_job_event(job, WP_EVENT_STARTED);
    check(wp_job_cancel(job), "wp_job_cancel");
    {
        wp_job_result *result = wait_result(job);
        printf("cancelled by handle: %s\n", outcome_name(wp_job_result_outcome(result)));
        wp_job_result_free(result);
    }
    wp_job_free(job);

    /* A detached job outlives its client; an attached one does not. */
    check(wp_job_spec_new("printf kept; exit 3", &spec), "wp_job_spec_new");
    check(wp_job_spec_set_detached(spec, true), "wp_job_spec_set_detached");
    check(wp_client_submit_spec(client, spec, &job), "submit detached");
    wp_job_spec_free(spec);
    uint64_t detached = wp_job_id(job);
    wp_job_free(job);
    wp_job *sleeper = NULL;
    check(wp_client_submit(client, "sleep 600", &sleeper), "submit attached sleep");
    check(wp_client_close(client), "wp_client_close");
    check(wp_client_close(client), "wp_client_close again");
    printf("closed: connected %d\n", (int)wp_client_is_connected(client));
    refused("submit after close", wp_client_submit(client, "true", &job));
    /* A job handle outlives its client. */
    wp_client_free(client);
    {
        wp_job_result *result = wait_result(sleeper);
        printf("attached job after close: %s\n", outcome_name(wp_job_result_outcome(result)));
        wp_job_result_free(result);
    }
    wp_job_free(sleeper);

    check(wp_client_config_set_name(cc, "c-remote-client-2"), "client set_name");
    check(wp_client_connect(cc, &client), "wp_client_connect again");
    wp_client_config_free(cc);
    check(wp_client_attach(client, detached, &job), "wp_client_attach");
    {
        wp_job_result *result = wait_result(job);
        printf("attached from another client: %s %d, stdout %s\n", outcome_name(wp_job_result_outcome(result)),
               wp_job_result_exit_code(result), same(wp_job_result_stdout(result), "kept") ? "kept" : "?");
        wp_job_result_free(result);
    }
    wp_job_free(job);
    wp_client_free(client);

    wp_worker_free(worker);
    wp_manager_free(manager);
    printf("done\n");
    return 0;
}
