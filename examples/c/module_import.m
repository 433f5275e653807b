/*
 * module_import: the C API imported as the clang module `WorkPool`, the way Swift's
 * importer reads it (through include/module.modulemap, not by including the header).
 *
 *   cargo build --release
 *   clang -fmodules -fmodules-cache-path=/tmp/wp-modules \
 *       -fmodule-map-file=include/module.modulemap examples/c/module_import.m \
 *       target/release/libworkpool.a -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc -o module_import
 *   ./module_import
 *
 * No Objective-C runtime is used: `@import` is the only Objective-C in it. It exercises
 * types, enums and functions from the module without a network: a job spec, a manager
 * configuration that cannot start (no identity), and the result names.
 */
@import WorkPool;

#include <stdio.h>
#include <string.h>

int main(void) {
    wp_job_spec *spec = NULL;
    if (wp_job_spec_new("echo from a module", &spec) != WP_RESULT_OK) {
        return 1;
    }
    wp_result r = wp_job_spec_add_env(spec, "WORKPOOL_JOB_ID", "7");
    printf("reserved variable: %s\n", wp_result_name(r));
    printf("valid: %s, wire size %s\n", wp_result_name(wp_job_spec_validate(spec)),
           wp_job_spec_wire_size(spec) > strlen("echo from a module") ? "ok" : "too small");
    wp_job_spec_free(spec);

    wp_manager_config *config = NULL;
    wp_manager *manager = NULL;
    if (wp_manager_config_new(&config) != WP_RESULT_OK) {
        return 1;
    }
    r = wp_manager_start(config, &manager);
    char why[256];
    wp_last_error_message(why, sizeof why);
    printf("start without identity: %s (%s), manager %s\n", wp_result_name(r), why,
           manager == NULL ? "untouched" : "written");
    wp_manager_config_free(config);
    wp_log_level level = WP_LOG_INFO;
    printf("log level off again: %s\n", wp_result_name(wp_set_log_callback(NULL, NULL, level)));
    printf("module ok\n");
    return 0;
}
