/*
 * lone_worker: one worker, embedded in a C program, serving a manager elsewhere (for
 * example the CLI: `workpool manager ...`). It runs until its standard input closes.
 *
 *   ./lone_worker HOST PORT CERT_DIR NAME [JOB_USER]
 * uses CERT_DIR/worker-0-cert.pem, worker-0-key.pem and host-cert.pem. With JOB_USER
 * (the program must run as root) every job runs as that user.
 *
 * Like many host programs it holds a descriptor opened without O_CLOEXEC (here, its key
 * file): jobs inherit none of the host's descriptors, only stdin, stdout and stderr.
 */
#define _POSIX_C_SOURCE 200809L
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "workpool.h"

static void check(wp_result r, const char *what) {
    if (r != WP_RESULT_OK) {
        char msg[512];
        wp_last_error_message(msg, sizeof msg);
        fprintf(stderr, "%s failed: %s: %s\n", what, wp_result_name(r), msg);
        exit(1);
    }
}

int main(int argc, char **argv) {
    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: %s HOST PORT CERT_DIR NAME [JOB_USER]\n", argv[0]);
        return 2;
    }
    char cert[1024], key[1024], pinned[1024];
    snprintf(cert, sizeof cert, "%s/worker-0-cert.pem", argv[3]);
    snprintf(key, sizeof key, "%s/worker-0-key.pem", argv[3]);
    snprintf(pinned, sizeof pinned, "%s/host-cert.pem", argv[3]);
    int held = open(key, O_RDONLY); /* no O_CLOEXEC */
    if (held < 0) {
        perror(key);
        return 1;
    }

    wp_worker_config *wc = NULL;
    check(wp_worker_config_new(&wc), "wp_worker_config_new");
    check(wp_worker_config_set_manager(wc, argv[1], (uint16_t)atoi(argv[2])), "set_manager");
    check(wp_worker_config_set_identity_pem_files(wc, cert, key), "identity");
    check(wp_worker_config_add_manager_certificate_pem_file(wc, pinned), "pin manager");
    check(wp_worker_config_set_name(wc, argv[4]), "set_name");
    check(wp_worker_config_set_slots(wc, 2), "set_slots");
    if (argc == 6) {
        check(wp_worker_config_set_job_user(wc, argv[5]), "set_job_user");
    }
    wp_worker *worker = NULL;
    check(wp_worker_start(wc, &worker), "wp_worker_start");
    wp_worker_config_free(wc);
    printf("worker %s started\n", argv[4]);
    fflush(stdout);

    /* Serve until stdin closes. */
    while (getchar() != EOF) {
    }
    wp_worker_free(worker);
    close(held);
    printf("worker stopped\n");
    return 0;
}
