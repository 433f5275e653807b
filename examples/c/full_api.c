/*
 * full_api: the whole C API in one program. A manager and two workers in this process,
 * over mutual TLS on loopback; logs through a callback; jobs with an environment, binary
 * stdin, a timeout, tags, a platform, a priority and retries; waits with results and the
 * output cap; statuses, lists and cancels by id; a job paused for a slow reader; stats;
 * the pool's events; a worker stopped, started again and drained; a shutdown with a grace;
 * and a manager that trusts submitters only, refusing a worker that shows a submitter's
 * certificate.
 *
 *   cargo build --release
 *   cargo run --release --example workpool -- generate-tls-certificates \
 *       --number-of-workers 2 --hostname localhost --output-dir certs
 *   cc -std=c11 -Wall -Wextra -Werror -I include examples/c/full_api.c \
 *       target/release/libworkpool.a -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc -o full_api
 *   ./full_api certs
 *
 * It checks every result, prints what it saw (the test reads these lines), and exits
 * non-zero on the first surprise, saying why. Every wait has a deadline; polling loops
 * (for a state that has no event) give up after one too.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
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

static const char *state_name(wp_job_state s) {
    switch (s) {
    case WP_JOB_STATE_QUEUED: return "queued";
    case WP_JOB_STATE_RUNNING: return "running";
    case WP_JOB_STATE_DISCONNECTED: return "disconnected";
    default: return "none";
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

static void pause_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

/* The log callback: called from workpool's threads, several at once. */
static atomic_int log_records;
static atomic_int log_saw_listening;
static atomic_int log_saw_role_refusal;

static void on_log(void *userdata, const wp_log_record *record) {
    atomic_int *count = userdata;
    atomic_fetch_add(count, 1);
    if (record->level == WP_LOG_INFO && strcmp(record->target, "workpool::manager") == 0 &&
        strstr(record->message, "listening on") != NULL) {
        atomic_store(&log_saw_listening, 1);
    }
    if (record->level == WP_LOG_WARN && strstr(record->message, "a submitter certificate cannot take jobs") != NULL) {
        atomic_store(&log_saw_role_refusal, 1);
    }
}

/* Waits for the pool event of `kind` about `name` (NULL: any worker), skipping others. */
static void await_pool_event(wp_subscription *sub, wp_manager_event_kind kind, const char *name) {
    double deadline = now_s() + WAIT_MS / 1000.0;
    while (now_s() < deadline) {
        wp_manager_event ev;
        wp_result r = wp_subscription_next(sub, 1000, &ev);
        if (r == WP_RESULT_TIMEOUT) {
            continue;
        }
        check(r, "wp_subscription_next");
        if (ev.kind != kind || (name != NULL && strcmp(ev.worker_name, name) != 0)) {
            continue;
        }
        if (kind == WP_MANAGER_EVENT_WORKER_JOINED) {
            const wp_worker_info *w = ev.worker;
            expect(w != NULL && ev.reason == NULL, "a joined event has its worker");
            expect(wp_worker_info_id(w) == ev.worker_id, "the event's id is the worker's");
            printf("joined: %s platform %s slots %u tags", wp_worker_info_name(w), wp_worker_info_platform(w),
                   wp_worker_info_slots(w));
            for (size_t i = 0; i < wp_worker_info_tag_count(w); i++) {
                printf(" %s", wp_worker_info_tag(w, i));
            }
            printf("\n");
        } else {
            expect(ev.worker == NULL && ev.reason != NULL && ev.reason[0] != 0, "a left event has a reason");
            printf("left: %s (a reason is given)\n", ev.worker_name);
        }
        return;
    }
    fprintf(stderr, "no pool event %u for %s in time\n", (unsigned)kind, name != NULL ? name : "any worker");
    exit(1);
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

/* Whether `len` bytes at `hay` hold the text `needle`. */
static int holds(const uint8_t *hay, size_t len, const char *needle) {
    size_t n = strlen(needle);
    for (size_t i = 0; n <= len && i <= len - n; i++) {
        if (memcmp(hay + i, needle, n) == 0) {
            return 1;
        }
    }
    return 0;
}

/* Reads a job's output events until what came holds `needle` (the job must not end first). */
static void await_output(wp_job *job, const char *needle) {
    uint8_t seen[4096];
    size_t len = 0;
    while (!holds(seen, len, needle)) {
        wp_event ev = await_job_event(job, WP_EVENT_OUTPUT);
        expect(len + ev.len <= sizeof seen, "the awaited output in 4 KiB");
        memcpy(seen + len, ev.data, ev.len);
        len += ev.len;
    }
}

static wp_job_result *wait_result(wp_job *job) {
    wp_job_result *result = NULL;
    check(wp_job_wait_timeout(job, WAIT_MS, &result), "wp_job_wait_timeout");
    return result;
}

static wp_worker *start_worker(wp_worker_config *wc) {
    wp_worker *w = NULL;
    check(wp_worker_start(wc, &w), "wp_worker_start");
    return w;
}

/* The worker's own view of its connection; it can lag the manager's by a moment. */
static void await_connected(const wp_worker *w) {
    double deadline = now_s() + WAIT_MS / 1000.0;
    while (!wp_worker_is_connected(w)) {
        expect(now_s() < deadline, "the worker sees its connection in time");
        pause_ms(5);
    }
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

    /* Logs: every record at INFO and above, from any thread. A level that is not one is refused. */
    refused("log level 9", wp_set_log_callback(on_log, &log_records, 9));
    check(wp_set_log_callback(on_log, &log_records, WP_LOG_INFO), "wp_set_log_callback");

    /* A manager that trusts submitters only: it needs some trust to start; a bad path is
       refused; with a submitter certificate pinned it starts, and a worker presenting that
       certificate is refused as a worker (the refusal says why, in the log). */
    {
        wp_manager_config *sc = NULL;
        wp_manager *submitters_only = NULL;
        check(wp_manager_config_new(&sc), "wp_manager_config_new");
        check(wp_manager_config_set_listen(sc, "127.0.0.1:0"), "set_listen");
        check(wp_manager_config_set_identity_pem_files(sc, path(dir, "host-cert.pem", a, sizeof a),
                                                       path(dir, "host-key.pem", b, sizeof b)),
              "manager identity");
        refused("nothing trusted", wp_manager_start(sc, &submitters_only));
        refused("missing submitter CA", wp_manager_config_add_submitter_ca_pem_file(sc, "/nonexistent/ca.pem"));
        refused("missing submitter certificate",
                wp_manager_config_add_submitter_certificate_pem_file(sc, "/nonexistent/submitter.pem"));
        refused("a key as a submitter CA",
                wp_manager_config_add_submitter_ca_pem_file(sc, path(dir, "worker-1-key.pem", a, sizeof a)));
        check(wp_manager_config_add_submitter_certificate_pem_file(sc, path(dir, "worker-1-cert.pem", a, sizeof a)),
              "pin a submitter");
        check(wp_manager_start(sc, &submitters_only), "start a manager that trusts submitters only");
        wp_manager_config_free(sc);
        printf("submitters-only manager: started\n");

        wp_worker_config *swc = NULL;
        check(wp_worker_config_new(&swc), "wp_worker_config_new");
        check(wp_worker_config_set_manager(swc, "127.0.0.1", wp_manager_port(submitters_only)), "set_manager");
        check(wp_worker_config_set_identity_pem_files(swc, path(dir, "worker-1-cert.pem", a, sizeof a),
                                                      path(dir, "worker-1-key.pem", b, sizeof b)),
              "worker identity");
        check(wp_worker_config_add_manager_certificate_pem_file(swc, path(dir, "host-cert.pem", a, sizeof a)),
              "pin manager");
        check(wp_worker_config_set_name(swc, "c-submitter-as-worker"), "set_name");
        check(wp_worker_config_set_backoff_initial_ms(swc, 20), "set_backoff_initial_ms");
        wp_worker *w = start_worker(swc);
        wp_worker_config_free(swc);
        double deadline = now_s() + WAIT_MS / 1000.0;
        while (wp_worker_connection_attempts(w) < 2) {
            expect(now_s() < deadline, "the worker with a submitter certificate tries twice in time");
            pause_ms(5);
        }
        printf("worker with a submitter certificate: sessions %llu, refusal logged: %s\n",
               (unsigned long long)wp_worker_sessions(w), atomic_load(&log_saw_role_refusal) ? "yes" : "no");
        wp_worker_free(w);
        wp_manager_free(submitters_only);
    }

    /* The manager: every setting, bad values refused with a reason. */
    wp_manager_config *mc = NULL;
    check(wp_manager_config_new(&mc), "wp_manager_config_new");
    check(wp_manager_config_set_listen(mc, "127.0.0.1:0"), "set_listen");
    check(wp_manager_config_set_identity_pem_files(mc, path(dir, "host-cert.pem", a, sizeof a),
                                                   path(dir, "host-key.pem", b, sizeof b)),
          "manager identity");
    check(wp_manager_config_add_worker_certificate_pem_file(mc, path(dir, "worker-0-cert.pem", a, sizeof a)),
          "pin worker 0");
    /* The former name of the same setter. */
    check(wp_manager_config_add_worker_root_pem_file(mc, path(dir, "worker-1-cert.pem", a, sizeof a)),
          "pin worker 1");
    refused("zero queue capacity", wp_manager_config_set_queue_capacity(mc, 0));
    check(wp_manager_config_set_queue_capacity(mc, 1000), "set_queue_capacity");
    refused("zero heartbeat interval", wp_manager_config_set_heartbeat_interval_ms(mc, 0));
    check(wp_manager_config_set_heartbeat_interval_ms(mc, 500), "set_heartbeat_interval_ms");
    check(wp_manager_config_set_heartbeat_timeout_ms(mc, 10000), "set_heartbeat_timeout_ms");
    check(wp_manager_config_set_shutdown_grace_ms(mc, 2000), "set_shutdown_grace_ms");
    check(wp_manager_config_set_reconnect_grace_ms(mc, 1000), "set_reconnect_grace_ms");
    refused("bad metrics address", wp_manager_config_set_metrics_address(mc, "nowhere"));
    check(wp_manager_config_set_metrics_address(mc, "127.0.0.1:0"), "set_metrics_address");
    check(wp_manager_config_set_result_output_limit(mc, 64), "set_result_output_limit");
    check(wp_manager_config_set_handshake_timeout_ms(mc, 5000), "set_handshake_timeout_ms");
    check(wp_manager_config_set_max_handshakes(mc, 64), "set_max_handshakes");
    check(wp_manager_config_set_max_handshakes_per_source(mc, 8), "set_max_handshakes_per_source");
    check(wp_manager_config_set_max_connections_per_certificate(mc, 2), "set_max_connections_per_certificate");
    check(wp_manager_config_set_max_heartbeats_per_second(mc, 5000), "set_max_heartbeats_per_second");
    check(wp_manager_config_set_detached_output_limit(mc, 65536), "set_detached_output_limit");
    refused("zero sessions per certificate", wp_manager_config_set_max_sessions_per_certificate(mc, 0));
    check(wp_manager_config_set_max_sessions_per_certificate(mc, 16), "set_max_sessions_per_certificate");
    refused("a retention over 365 days",
            wp_manager_config_set_detached_retention(mc, 366ULL * 86400 * 1000, 10));
    check(wp_manager_config_set_detached_retention(mc, 60000, 10), "set_detached_retention");
    wp_manager *manager = NULL;
    check(wp_manager_start(mc, &manager), "wp_manager_start");
    wp_manager_config_free(mc);
    printf("metrics port: %s\n", wp_manager_metrics_port(manager) != 0 ? "ok" : "none");
    wp_subscription *pool = NULL;
    check(wp_manager_subscribe(manager, &pool), "wp_manager_subscribe");

    /* Two workers: every setting. Worker 0 alone has the tag "gpu". */
    wp_worker_config *wc[2] = {NULL, NULL};
    wp_worker *workers[2] = {NULL, NULL};
    for (int i = 0; i < 2; i++) {
        char name[32], cert[64], key[64], work[64];
        snprintf(name, sizeof name, "c-worker-%d", i);
        snprintf(cert, sizeof cert, "worker-%d-cert.pem", i);
        snprintf(key, sizeof key, "worker-%d-key.pem", i);
        snprintf(work, sizeof work, "work-%d", i);
        mkdir(path(dir, work, a, sizeof a), 0700);
        check(wp_worker_config_new(&wc[i]), "wp_worker_config_new");
        check(wp_worker_config_set_manager(wc[i], "127.0.0.1", wp_manager_port(manager)), "set_manager");
        check(wp_worker_config_set_identity_pem_files(wc[i], path(dir, cert, a, sizeof a), path(dir, key, b, sizeof b)),
              "worker identity");
        if (i == 0) {
            check(wp_worker_config_add_manager_certificate_pem_file(wc[i], path(dir, "host-cert.pem", a, sizeof a)),
                  "pin manager");
        } else {
            check(wp_worker_config_add_manager_root_pem_file(wc[i], path(dir, "host-cert.pem", a, sizeof a)),
                  "pin manager (former name)");
        }
        check(wp_worker_config_set_verify_hostname(wc[i], true), "set_verify_hostname");
        check(wp_worker_config_set_name(wc[i], name), "set_name");
        check(wp_worker_config_add_tag(wc[i], "c"), "add_tag");
        if (i == 0) {
            check(wp_worker_config_add_tag(wc[i], "gpu"), "add_tag gpu");
        }
        check(wp_worker_config_set_slots(wc[i], 2), "set_slots");
        check(wp_worker_config_set_ahead(wc[i], 1), "set_ahead");
        check(wp_worker_config_set_platform(wc[i], "c-platform"), "set_platform");
        check(wp_worker_config_set_work_dir(wc[i], path(dir, work, a, sizeof a)), "set_work_dir");
        check(wp_worker_config_set_connect_timeout_ms(wc[i], 10000), "set_connect_timeout_ms");
        check(wp_worker_config_set_backoff_initial_ms(wc[i], 20), "set_backoff_initial_ms");
        check(wp_worker_config_set_backoff_max_ms(wc[i], 300), "set_backoff_max_ms");
        check(wp_worker_config_set_kill_grace_ms(wc[i], 1000), "set_kill_grace_ms");
        check(wp_worker_config_set_reconnect_buffer(wc[i], 1 << 20), "set_reconnect_buffer");
        if (i == 0) {
            refused("empty platform", wp_worker_config_set_platform(wc[i], ""));
            refused("missing work folder", wp_worker_config_set_work_dir(wc[i], "/nonexistent/work"));
            refused("zero backoff", wp_worker_config_set_backoff_initial_ms(wc[i], 0));
            /* A job user needs a root process; only the empty name is refused here. */
            refused("empty job user", wp_worker_config_set_job_user(wc[i], ""));
        }
        workers[i] = start_worker(wc[i]);
    }
    /* Both join, in either order. */
    await_pool_event(pool, WP_MANAGER_EVENT_WORKER_JOINED, NULL);
    await_pool_event(pool, WP_MANAGER_EVENT_WORKER_JOINED, NULL);
    for (int i = 0; i < 2; i++) {
        await_connected(workers[i]);
        printf("worker %s: connected, sessions %llu, attempts %s\n", wp_worker_name(workers[i]),
               (unsigned long long)wp_worker_sessions(workers[i]),
               wp_worker_connection_attempts(workers[i]) >= 1 ? "ok" : "none");
    }

    /* The pool as the manager sees it. */
    wp_worker_list *list = NULL;
    check(wp_manager_workers(manager, &list), "wp_manager_workers");
    printf("workers listed: %zu\n", wp_worker_list_len(list));
    for (size_t i = 0; i < wp_worker_list_len(list); i++) {
        const wp_worker_info *w = wp_worker_list_get(list, i);
        printf("listed: %s on %s, %u slots, running %zu, draining %d, address %s\n", wp_worker_info_name(w),
               wp_worker_info_platform(w), wp_worker_info_slots(w), wp_worker_info_running(w),
               (int)wp_worker_info_draining(w), wp_worker_info_address(w) != NULL ? "known" : "unknown");
    }
    expect(wp_worker_list_get(list, 2) == NULL, "past the end is NULL");
    wp_worker_list_free(list);

    /* A job with every option. Bad values are refused at the setter. */
    wp_job_spec *spec = NULL;
    refused("blank script", wp_job_spec_new("   ", &spec));
    check(wp_job_spec_new("echo \"$GREETING, $WHO\"; od -An -tx1 -v | tr -s ' \\n' ' '; echo", &spec),
          "wp_job_spec_new");
    refused("reserved variable", wp_job_spec_add_env(spec, "WORKPOOL_X", "1"));
    refused("variable name with =", wp_job_spec_add_env(spec, "A=B", "1"));
    refused("zero timeout", wp_job_spec_set_timeout_ms(spec, 0));
    refused("empty tag", wp_job_spec_require_tag(spec, ""));
    refused("stdin NULL with a length", wp_job_spec_set_stdin(spec, NULL, 3));
    static const uint8_t input[] = {'a', 0, 'b', '\n', 0xff};
    check(wp_job_spec_add_env(spec, "GREETING", "hello"), "add_env");
    check(wp_job_spec_add_env(spec, "WHO", "c"), "add_env");
    check(wp_job_spec_set_stdin(spec, input, sizeof input), "set_stdin");
    check(wp_job_spec_set_timeout_ms(spec, 60000), "set_timeout_ms");
    check(wp_job_spec_set_kill_grace_ms(spec, 500), "set_kill_grace_ms");
    check(wp_job_spec_require_tag(spec, "c"), "require_tag");
    check(wp_job_spec_require_platform(spec, "c-platform"), "require_platform");
    check(wp_job_spec_set_priority(spec, 5), "set_priority");
    check(wp_job_spec_set_retries(spec, 1), "set_retries");
    check(wp_job_spec_set_detached(spec, false), "set_detached");
    check(wp_job_spec_validate(spec), "wp_job_spec_validate");
    printf("wire size: %s\n", wp_job_spec_wire_size(spec) > sizeof input ? "ok" : "too small");
    wp_job *job = NULL;
    check(wp_manager_submit_spec(manager, spec, &job), "wp_manager_submit_spec");
    wp_job_spec_free(spec);
    wp_job_result *result = NULL;
    check(wp_job_wait(job, &result), "wp_job_wait");
    expect(wp_job_result_id(result) == wp_job_id(job), "the result's id is the job's");
    wp_bytes out = wp_job_result_stdout(result);
    printf("full job: outcome %s, exit %d, signal %d, attempts %u, on %s, truncated %d, warnings %zu\n",
           outcome_name(wp_job_result_outcome(result)), wp_job_result_exit_code(result), wp_job_result_signal(result),
           wp_job_result_attempts(result), wp_job_result_worker(result), (int)wp_job_result_truncated(result),
           wp_job_result_warning_count(result));
    printf("full job stdout: %.*s", (int)out.len, (const char *)out.data);
    expect(wp_job_result_stderr(result).len == 0, "no stderr");
    expect(wp_job_result_reason(result) == NULL && wp_job_result_warning(result, 0) == NULL, "no reason, no warning");
    /* Its end was delivered: a second wait says so. */
    wp_job_result *again = NULL;
    printf("second wait: %s\n", wp_result_name(wp_job_wait(job, &again)));
    wp_job_result_free(result);
    wp_job_free(job);

    wp_event ev;

    /* The output cap (64 bytes here): the result is cut and says so. */
    check(wp_manager_submit(manager, "head -c 200 /dev/zero | tr '\\0' x", &job), "submit");
    result = wait_result(job);
    printf("capped: %zu bytes, truncated %d\n", wp_job_result_stdout(result).len, (int)wp_job_result_truncated(result));
    wp_job_result_free(result);
    wp_job_free(job);

    /* A timeout, and a signal. */
    check(wp_job_spec_new("sleep 30", &spec), "wp_job_spec_new");
    check(wp_job_spec_set_timeout_ms(spec, 300), "set_timeout_ms");
    check(wp_manager_submit_spec(manager, spec, &job), "submit timeout");
    wp_job_spec_free(spec);
    result = wait_result(job);
    printf("timeout: outcome %s, exit %d\n", outcome_name(wp_job_result_outcome(result)), wp_job_result_exit_code(result));
    wp_job_result_free(result);
    wp_job_free(job);
    check(wp_manager_submit(manager, "kill -KILL $$", &job), "submit signal");
    result = wait_result(job);
    printf("signal: outcome %s, signal %d, exit %d\n", outcome_name(wp_job_result_outcome(result)),
           wp_job_result_signal(result), wp_job_result_exit_code(result));
    wp_job_result_free(result);
    wp_job_free(job);
    check(wp_manager_submit(manager, "kill -TERM $$", &job), "submit signal");
    ev = await_job_event(job, WP_EVENT_FINISHED);
    printf("signal event: outcome %s, signal %d, exit %d, attempt %u\n", outcome_name(ev.outcome), ev.signal,
           ev.exit_code, ev.attempt);
    wp_job_free(job);

    /* A queued job: its status, the list, a cancel by id. No worker has the tag "nowhere". */
    check(wp_job_spec_new("true", &spec), "wp_job_spec_new");
    check(wp_job_spec_require_tag(spec, "nowhere"), "require_tag");
    check(wp_job_spec_set_priority(spec, 7), "set_priority");
    check(wp_manager_submit_spec(manager, spec, &job), "submit queued");
    wp_job_spec_free(spec);
    uint64_t id = wp_job_id(job);
    wp_job_status *status = NULL;
    check(wp_manager_job_status(manager, id, &status), "wp_manager_job_status");
    printf("queued status: state %s, worker %s, attempt %u, priority %d, script %s, paused %d, since %s\n",
           state_name(wp_job_status_state(status)), wp_job_status_worker(status) == NULL ? "none" : "some",
           wp_job_status_attempt(status), wp_job_status_priority(status), wp_job_status_script(status),
           (int)wp_job_status_output_paused(status), wp_job_status_since_ms(status) < 3600000 ? "ok" : "odd");
    expect(wp_job_status_id(status) == id, "the status is the job's");
    wp_job_status_free(status);
    wp_job_list *jobs = NULL;
    check(wp_manager_jobs(manager, &jobs), "wp_manager_jobs");
    int listed = 0;
    for (size_t i = 0; i < wp_job_list_len(jobs); i++) {
        listed |= wp_job_status_id(wp_job_list_get(jobs, i)) == id;
    }
    expect(wp_job_list_get(jobs, wp_job_list_len(jobs)) == NULL, "past the end is NULL");
    printf("queued job listed: %s\n", listed ? "yes" : "no");
    wp_job_list_free(jobs);
    check(wp_manager_cancel(manager, id), "wp_manager_cancel");
    result = wait_result(job);
    printf("cancelled queued: outcome %s\n", outcome_name(wp_job_result_outcome(result)));
    wp_job_result_free(result);
    wp_job_free(job);
    printf("cancel again: %s\n", wp_result_name(wp_manager_cancel(manager, id)));
    printf("status after the end: %s\n", wp_result_name(wp_manager_job_status(manager, id, &status)));

    /* A running job: its status names its worker; cancelled by id, followed by events. */
    check(wp_manager_submit(manager, "echo running; sleep 30", &job), "submit running");
    id = wp_job_id(job);
    await_job_event(job, WP_EVENT_OUTPUT);
    check(wp_manager_job_status(manager, id, &status), "wp_manager_job_status");
    printf("running status: state %s, on c-worker-: %s\n", state_name(wp_job_status_state(status)),
           strncmp(wp_job_status_worker(status), "c-worker-", 9) == 0 ? "yes" : "no");
    wp_job_status_free(status);
    check(wp_manager_cancel(manager, id), "wp_manager_cancel");
    ev = await_job_event(job, WP_EVENT_FINISHED);
    printf("cancelled running: outcome %s, exit %d, signal %d, attempt %u\n", outcome_name(ev.outcome), ev.exit_code,
           ev.signal, ev.attempt);
    printf("wait after the last event: %s\n", wp_result_name(wp_job_wait_timeout(job, 0, &again)));
    wp_job_free(job);

    /* An interactive job: each line written comes back before the next is written. */
    check(wp_job_spec_new("cat", &spec), "wp_job_spec_new cat");
    check(wp_job_spec_set_interactive(spec, true), "wp_job_spec_set_interactive");
    check(wp_manager_submit_spec(manager, spec, &job), "submit cat");
    wp_job_spec_free(spec);
    for (int i = 0; i < 3; i++) {
        char line[32];
        int n = snprintf(line, sizeof line, "line %d\n", i);
        check(wp_job_write_stdin(job, (const uint8_t *)line, (size_t)n), "wp_job_write_stdin");
        await_output(job, line);
    }
    check(wp_job_close_stdin(job), "wp_job_close_stdin");
    refused("write after close", wp_job_write_stdin(job, (const uint8_t *)"x", 1));
    result = wait_result(job);
    printf("interactive cat: 3 lines echoed one at a time, outcome %s, exit %d\n",
           outcome_name(wp_job_result_outcome(result)), wp_job_result_exit_code(result));
    wp_job_result_free(result);
    wp_job_free(job);
    check(wp_manager_submit(manager, "true", &job), "submit plain");
    refused("stdin of a plain job", wp_job_write_stdin(job, (const uint8_t *)"x", 1));
    refused("resize of a plain job", wp_job_resize(job, 10, 10));
    wp_job_result_free(wait_result(job));
    wp_job_free(job);

    /* A terminal job: `stty size` shows the size asked for, then the new one. */
    check(wp_job_spec_new("stty size; read _; stty size", &spec), "wp_job_spec_new stty");
    refused("zero-row terminal", wp_job_spec_set_pty(spec, 0, 80));
    check(wp_job_spec_set_pty(spec, 24, 80), "wp_job_spec_set_pty");
    check(wp_manager_submit_spec(manager, spec, &job), "submit stty");
    wp_job_spec_free(spec);
    await_output(job, "24 80");
    printf("pty size: 24 80\n");
    check(wp_job_resize(job, 40, 100), "wp_job_resize");
    check(wp_job_write_stdin(job, (const uint8_t *)"\n", 1), "wp_job_write_stdin newline");
    result = wait_result(job);
    out = wp_job_result_stdout(result);
    printf("pty resized: %s, outcome %s\n", holds(out.data, out.len, "40 100") ? "40 100" : "not seen",
           outcome_name(wp_job_result_outcome(result)));
    wp_job_result_free(result);
    wp_job_free(job);

    /* A job nobody reads: its output is paused (polled: pausing has no event). */
    check(wp_manager_submit(manager, "exec yes", &job), "submit yes");
    id = wp_job_id(job);
    double deadline = now_s() + WAIT_MS / 1000.0;
    int paused = 0;
    while (!paused && now_s() < deadline) {
        if (wp_manager_job_status(manager, id, &status) == WP_RESULT_OK) {
            paused = wp_job_status_output_paused(status);
            wp_job_status_free(status);
        }
        if (!paused) {
            pause_ms(10);
        }
    }
    printf("output paused: %s\n", paused ? "yes" : "no");
    check(wp_job_cancel(job), "wp_job_cancel");
    result = wait_result(job);
    printf("paused job: outcome %s, kept %zu bytes, truncated %d\n", outcome_name(wp_job_result_outcome(result)),
           wp_job_result_stdout(result).len, (int)wp_job_result_truncated(result));
    wp_job_result_free(result);
    wp_job_free(job);

    /* Stats. */
    wp_stats *stats = NULL;
    check(wp_manager_stats(manager, &stats), "wp_manager_stats");
    wp_stats_figures f;
    check(wp_stats_get(stats, &f), "wp_stats_get");
    printf("stats: workers %zu, slots %zu, submitted %llu, ended %llu, exited %llu, timed out %llu, signaled %llu, "
           "cancelled %llu, queued %zu\n",
           f.workers, f.slots_total, (unsigned long long)f.jobs_submitted, (unsigned long long)f.jobs_ended,
           (unsigned long long)f.jobs_exited, (unsigned long long)f.jobs_timed_out, (unsigned long long)f.jobs_signaled,
           (unsigned long long)f.jobs_cancelled, f.jobs_queued);
    expect(f.output_bytes > 0 && f.queue_wait_count >= 5 && f.queue_wait_p99_us >= f.queue_wait_p50_us,
           "stats count output and waits");
    expect(f.jobs_rejected + f.jobs_worker_lost + f.jobs_spawn_failed == 0 && f.jobs_running == 0 &&
               f.slots_busy == 0 && f.workers_draining == 0 && f.jobs_disconnected == 0 &&
               f.oldest_queued_wait_ms == 0 && f.dispatch_latency_count >= 1 &&
               f.dispatch_latency_p99_us >= f.dispatch_latency_p50_us && f.queue_wait_sum_seconds >= 0 &&
               f.dispatch_latency_sum_seconds >= 0,
           "the other figures");
    printf("per worker: %zu\n", wp_stats_worker_count(stats));
    for (size_t i = 0; i < wp_stats_worker_count(stats); i++) {
        wp_worker_stats ws;
        check(wp_stats_worker(stats, i, &ws), "wp_stats_worker");
        printf("worker stats: %s, slots %u, running %zu, draining %d\n", ws.name, ws.slots, ws.running,
               (int)ws.draining);
        expect(ws.last_heard_ms < 3600000 && ws.connected_for_ms < 3600000 && ws.jobs_run < 100, "worker figures");
    }
    wp_worker_stats none;
    refused("worker stats past the end", wp_stats_worker(stats, 2, &none));
    printf("prometheus has workpool_workers 2: %s\n",
           strstr(wp_stats_prometheus(stats), "workpool_workers 2\n") != NULL ? "yes" : "no");
    wp_stats_free(stats);

    /* A retry: worker 0 (the only "gpu" one) stops under the job, which is queued again;
     * worker 0 comes back, takes it, and is drained with a short deadline under it. */
    check(wp_job_spec_new("echo up; sleep 30", &spec), "wp_job_spec_new");
    check(wp_job_spec_require_tag(spec, "gpu"), "require_tag");
    check(wp_job_spec_set_retries(spec, 1), "set_retries");
    check(wp_manager_submit_spec(manager, spec, &job), "submit retried");
    wp_job_spec_free(spec);
    await_job_event(job, WP_EVENT_OUTPUT);
    check(wp_worker_stop(workers[0]), "wp_worker_stop");
    ev = await_job_event(job, WP_EVENT_REQUEUED);
    printf("requeued: attempt %u, exit %d, outcome %s\n", ev.attempt, ev.exit_code, outcome_name(ev.outcome));
    await_pool_event(pool, WP_MANAGER_EVENT_WORKER_LEFT, "c-worker-0");
    printf("stopped worker connected: %d\n", (int)wp_worker_is_connected(workers[0]));
    wp_worker_free(workers[0]);
    workers[0] = start_worker(wc[0]);
    await_pool_event(pool, WP_MANAGER_EVENT_WORKER_JOINED, "c-worker-0");
    ev = await_job_event(job, WP_EVENT_STARTED);
    printf("restarted on: %.*s\n", (int)ev.len, (const char *)ev.data);
    await_job_event(job, WP_EVENT_OUTPUT);
    printf("wait before draining: %s\n", wp_result_name(wp_worker_wait(workers[0], 0)));
    check(wp_worker_drain_within(workers[0], 200), "wp_worker_drain_within");
    result = wait_result(job);
    /* (Its STARTED events were read above, so the result counts no attempt.) */
    printf("drained under it: outcome %s\n", outcome_name(wp_job_result_outcome(result)));
    wp_job_result_free(result);
    wp_job_free(job);
    check(wp_worker_wait(workers[0], WAIT_MS), "wp_worker_wait");
    await_pool_event(pool, WP_MANAGER_EVENT_WORKER_LEFT, "c-worker-0");

    /* Worker 1 drains without a deadline: its running job finishes, then it leaves. */
    check(wp_manager_submit(manager, "echo begun; sleep 0.3; echo finished while draining", &job), "submit");
    await_job_event(job, WP_EVENT_OUTPUT);
    check(wp_worker_drain(workers[1]), "wp_worker_drain");
    result = wait_result(job);
    out = wp_job_result_stdout(result);
    printf("drained after: outcome %s, exit %d, stdout %.*s", outcome_name(wp_job_result_outcome(result)),
           wp_job_result_exit_code(result), (int)out.len, (const char *)out.data);
    wp_job_result_free(result);
    wp_job_free(job);
    check(wp_worker_wait(workers[1], WAIT_MS), "wp_worker_wait");
    await_pool_event(pool, WP_MANAGER_EVENT_WORKER_LEFT, "c-worker-1");

    /* Shutdown with a grace: the job still queued is rejected, with a reason. */
    check(wp_manager_submit(manager, "true", &job), "submit before shutdown");
    check(wp_manager_shutdown_within(manager, 1000), "wp_manager_shutdown_within");
    check(wp_manager_shutdown(manager), "a second shutdown does nothing");
    result = wait_result(job);
    printf("at shutdown: outcome %s, reason given %s\n", outcome_name(wp_job_result_outcome(result)),
           wp_job_result_reason(result) != NULL ? "yes" : "no");
    wp_job_result_free(result);
    wp_job_free(job);
    wp_job *late = NULL;
    printf("submit after shutdown: %s\n", wp_result_name(wp_manager_submit(manager, "true", &late)));
    wp_manager_event pe;
    wp_result r = WP_RESULT_OK;
    for (int i = 0; i < 100 && r == WP_RESULT_OK; i++) {
        r = wp_subscription_next(pool, WAIT_MS, &pe);
    }
    printf("pool events after shutdown: %s\n", wp_result_name(r));

    /* Logs: off again, after which the callback is never called. */
    check(wp_set_log_callback(NULL, NULL, WP_LOG_OFF), "logs off");
    printf("log records: %s, saw listening: %s\n", atomic_load(&log_records) > 0 ? "yes" : "no",
           atomic_load(&log_saw_listening) ? "yes" : "no");

    wp_subscription_free(pool);
    wp_worker_free(workers[0]);
    wp_worker_free(workers[1]);
    wp_worker_config_free(wc[0]);
    wp_worker_config_free(wc[1]);
    wp_manager_free(manager);
    /* For the test that shows the leak checks work: one handle is never freed. */
    if (getenv("FULL_API_LEAK_ONE_SPEC") != NULL) {
        wp_job_spec *leaked = NULL;
        check(wp_job_spec_new("true", &leaked), "wp_job_spec_new");
        leaked = NULL;
        printf("leaked a spec\n");
    }
    printf("done\n");
    return 0;
}
