// meshlm worker: serve shards of a model to a coordinator until told to exit.
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "coordinator/cli/expert_args.h"
#include "cluster/profile.h"
#include "cluster/registry.h"
#include "coordinator/cli/cli.h"
#include "coordinator/cli/curve_args.h"
#include "coordinator/cli/expert_args.h"
#include "core/err.h"
#include "core/sha256.h"
#include "offload/attn.h"
#include "parallel/plan.h"
#include "worker/node/node.h"

// --- helpers

static void worker_usage(FILE *f) {
    fprintf(f,
            "usage: meshlm worker --listen ENDPOINT [options]\n"
            "  --listen ENDPOINT    control endpoint: tcp://HOST:PORT (data plane on PORT+1) or ipc:///PATH\n"
            "  -m, --model FILE     a local copy of the model (without it, slices come from the coordinator\n"
            "                       once and are kept in the cache)\n"
            "  --model-sha256 HEX   the model file's SHA-256, known already (not hashed again at start)\n"
            "  --cache-dir DIR      where received shards are kept (default $MESHLM_CACHE or ~/.cache/meshlm)\n"
            "  --name ID            this worker's name in plans (default worker-PID)\n"
            "  -t, --threads N      compute threads (default: all cores)\n"
            "  --mem-budget SIZE    memory for weights + KV cache + activations, e.g. 2G (reported to the\n"
            "                       planner); a share that does not fit streams its weights from disk\n"
            "  --timeout MS         deadline of each exchange with the coordinator and peers (default 30000)\n"
            "  --no-profile         do not measure this machine at start (planned as an average node)\n"
            "  --registry URL       join the node registry (redis://HOST:PORT[/DB][?prefix=P&timeout=MS]): publish\n"
            "                       this worker's profile, endpoint and state, and beat until it exits\n"
            "  --standby            join as a standby (a spare the coordinator takes when a worker is lost)\n"
            "  --registry-ttl MS    heartbeat TTL in the registry (default 3000; beats every TTL/3)\n"
            "  --advertise ENDPOINT the control endpoint published in the registry (default: --listen, with\n"
            "                       a 0.0.0.0 / * host replaced by this machine's address as the registry sees it)\n"
            "  --kv-device DEV      where this worker's KV cache lives and attention runs: host, file:DIR,\n"
            "                       storage:ENDPOINT, pim:PRESET (default: the coordinator's --kv-device, else\n"
            "                       host); wins over the coordinator's\n"
            "  --verbose            log every message\n"
            EXPERT_ARGS_USAGE
            CURVE_ARGS_USAGE);
}

// The registry side of a worker: its handle, its beater and its id.
typedef struct {
    registry_t *reg;              // NULL without --registry
    registry_beater_t *beater;    // keeps the heartbeat alive while the worker serves
    profile_t prof;               // this machine's figures (also the node's HELLO)
    registry_member_t rec;        // what is published
    bool joined;                  // rec is in the registry (leave it at the end)
} worker_reg_t;

// The endpoint to publish: advertise, or listen with a wildcard host replaced by this machine's
// address as the registry sees it. 0 or a registry error (message in err).
static int published_endpoint(registry_t *reg, const char *listen, const char *advertise, char *out, size_t cap,
                              char *err, size_t errlen) {
    if (advertise) {
        snprintf(out, cap, "%s", advertise);
        return 0;
    }
    const char *sep = strstr(listen, "://");
    const char *host = sep ? sep + 3 : listen;
    const char *colon = strrchr(host, ':');
    const size_t hlen = colon ? (size_t)(colon - host) : 0;
    const bool wild = sep && !strncmp(listen, "tcp", 3) && colon &&
                      ((hlen == 7 && !strncmp(host, "0.0.0.0", 7)) || (hlen == 1 && host[0] == '*') ||
                       (hlen == 4 && !strncmp(host, "[::]", 4)));
    if (!wild) {
        snprintf(out, cap, "%s", listen);
        return 0;
    }
    char addr[64];
    int rc = registry_local_addr(reg, addr, sizeof addr);
    if (rc != 0) return mlm_fail(err, errlen, rc, "%s", registry_error(reg));
    const bool v6 = strchr(addr, ':') != NULL;
    snprintf(out, cap, "tcp://%s%s%s%s", v6 ? "[" : "", addr, v6 ? "]" : "", colon);
    return 0;
}

// Joins the registry as "starting", starts the beater, measures this machine (and hashes the model)
// and publishes the figures with the state "idle". 0 or a negative MLM_ code (message in err).
static int worker_join(worker_reg_t *w, node_opts_t *o, const char *url, bool standby, int ttl_ms,
                       const char *advertise, char *err, size_t errlen) {
    int rc = registry_open(&w->reg, url, err, errlen);
    if (rc != 0) return rc;
    registry_member_t *m = &w->rec;
    memset(m, 0, sizeof *m);
    if (o->node_id) snprintf(m->id, sizeof m->id, "%s", o->node_id);
    else snprintf(m->id, sizeof m->id, "worker-%ld", (long)getpid()); // the name node_run gives itself
    if (!registry_id_valid(m->id))
        return mlm_fail(err, errlen, MLM_EINVAL, "--name '%s' is not a valid registry id", m->id);
    m->role = standby ? REGISTRY_ROLE_STANDBY : REGISTRY_ROLE_WORKER;
    m->state = REGISTRY_STATE_STARTING;
    m->pid = (int32_t)getpid();
    if (gethostname(m->host, sizeof m->host) != 0) m->host[0] = 0;
    m->host[sizeof m->host - 1] = 0;
    for (char *c = m->host; *c; c++)
        if ((unsigned char)*c <= 0x20 || (unsigned char)*c >= 0x7f) *c = '_';
    if ((rc = published_endpoint(w->reg, o->listen, advertise, m->endpoint, sizeof m->endpoint, err, errlen)) != 0)
        return rc;
    const long cores = sysconf(_SC_NPROCESSORS_ONLN);
    const uint32_t n_cores = (uint32_t)(o->n_threads > 0 ? o->n_threads : (cores > 0 ? cores : 1));
    registry_profile_from(&m->prof, NULL, n_cores, o->mem_budget);
    if ((rc = registry_join(w->reg, m, ttl_ms)) != 0) return mlm_fail(err, errlen, rc, "%s", registry_error(w->reg));
    w->joined = true;
    if ((rc = registry_beater_start(&w->beater, w->reg, m->id, 0)) != 0)
        return mlm_fail(err, errlen, rc, "%s", registry_error(w->reg));
    // The HELLO's figures, measured once: node_run takes them (and the model's hash) from here.
    const bool measured = !o->no_profile && profile_node(&w->prof, o->n_threads, o->model_path, 300, o->mem_budget) == 0;
    registry_profile_from(&m->prof, measured ? &w->prof : NULL, n_cores, o->mem_budget);
    if (measured) o->profile = &w->prof;
    if (o->model_path) {
        struct stat st;
        if (stat(o->model_path, &st) != 0)
            return mlm_fail(err, errlen, MLM_EIO, "%s: %s", o->model_path, strerror(errno));
        if (o->model_sha256) memcpy(m->prof.model_sha256, o->model_sha256, 32);
        else if ((rc = sha256_file(o->model_path, m->prof.model_sha256, err, errlen)) != 0) return rc;
        m->prof.has_model = true;
        m->prof.model_size = (uint64_t)st.st_size;
        o->model_sha256 = m->prof.model_sha256;
    }
    m->state = REGISTRY_STATE_IDLE;
    m->ttl_ms = 0; // keep the joined TTL
    if ((rc = registry_beater_update(w->beater, m)) != 0)
        return mlm_fail(err, errlen, rc, "%s: cannot publish the profile", m->id);
    if (o->verbose)
        fprintf(stderr, "[%s] joined registry %s as %s at %s\n", m->id, registry_url(w->reg),
                registry_role_name(m->role), m->endpoint);
    return 0;
}

// node_opts_t.on_state: the node's state, published at once.
static void publish_state(void *arg, node_state_t s) {
    worker_reg_t *w = arg;
    registry_beater_set_state(w->beater, s == NODE_LOADING   ? REGISTRY_STATE_LOADING
                                         : s == NODE_SERVING ? REGISTRY_STATE_SERVING
                                                             : REGISTRY_STATE_IDLE);
}

// Stops beating and leaves the registry (a failure to leave is one line: the TTL removes it anyway).
static void worker_leave(worker_reg_t *w) {
    if (!w->reg) return;
    registry_beater_stop(&w->beater);
    if (w->joined && registry_leave(w->reg, w->rec.id) != 0 && registry_error(w->reg)[0])
        fprintf(stderr, "meshlm worker: leaving the registry: %s\n", registry_error(w->reg));
    registry_destroy(&w->reg);
}

// 64 hex digits into 32 bytes. 0 or -1.
static int parse_sha256(const char *hex, uint8_t out[32]) {
    if (strlen(hex) != 64) return -1;
    for (int i = 0; i < 32; i++) {
        unsigned v;
        if (!isxdigit((unsigned char)hex[2 * i]) || !isxdigit((unsigned char)hex[2 * i + 1]) ||
            sscanf(hex + 2 * i, "%2x", &v) != 1)
            return -1;
        out[i] = (uint8_t)v;
    }
    return 0;
}

// --- public API

int cmd_worker(int argc, char **argv) {
    static const struct option opts[] = {
        {"listen", required_argument, 0, 'l'}, {"model", required_argument, 0, 'm'},
        {"cache-dir", required_argument, 0, 'C'}, {"name", required_argument, 0, 'N'},
        {"threads", required_argument, 0, 't'}, {"mem-budget", required_argument, 0, 'B'},
        {"timeout", required_argument, 0, 'T'}, {"verbose", no_argument, 0, 'v'},
        {"no-profile", no_argument, 0, 'P'}, {"registry", required_argument, 0, 'R'},
        {"standby", no_argument, 0, 'S'}, {"registry-ttl", required_argument, 0, 'L'},
        {"advertise", required_argument, 0, 'A'}, {"kv-device", required_argument, 0, 'K'}, CURVE_ARGS_LONGOPTS,
        EXPERT_ARGS_LONGOPTS, {"model-sha256", required_argument, 0, 'H'},
        {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    curve_args_t ca = {0};
    uint8_t sha[32]; // --model-sha256
    node_opts_t o = {0};
    expert_args_t ex;
    char wname[96]; // the expert cache's provider name
    expert_args_init(&ex);
    const char *reg_url = NULL, *advertise = NULL;
    bool standby = false;
    int reg_ttl = REGISTRY_DEFAULT_TTL_MS;
    optind = 1;
    int ch;
    while ((ch = getopt_long(argc, argv, "l:m:t:h", opts, NULL)) != -1) {
        if (curve_args_option(&ca, ch, optarg)) continue;
        const int er = expert_args_option(&ex, ch, optarg, "worker");
        if (er < 0) return 2;
        if (er > 0) continue;
        switch (ch) {
        case 'l': o.listen = optarg; break;
        case 'm': o.model_path = optarg; break;
        case 'C': o.cache_dir = optarg; break;
        case 'N': o.node_id = optarg; break;
        case 't': o.n_threads = atoi(optarg); break;
        case 'B':
            if (plan_parse_size(optarg, &o.mem_budget) != 0) {
                fprintf(stderr, "meshlm worker: bad --mem-budget '%s'\n", optarg);
                return 2;
            }
            break;
        case 'T': o.timeout_ms = atoi(optarg); break;
        case 'v': o.verbose = true; break;
        case 'P': o.no_profile = true; break;
        case 'R': reg_url = optarg; break;
        case 'S': standby = true; break;
        case 'A': advertise = optarg; break;
        case 'K': o.kv_device = optarg; break;
        case 'H':
            if (parse_sha256(optarg, sha) != 0) {
                fprintf(stderr, "meshlm worker: bad --model-sha256 '%s' (want 64 hex digits)\n", optarg);
                return 2;
            }
            o.model_sha256 = sha;
            break;
        case 'L':
            reg_ttl = atoi(optarg);
            if (reg_ttl < 30) {
                fprintf(stderr, "meshlm worker: bad --registry-ttl '%s' (ms, at least 30)\n", optarg);
                return 2;
            }
            break;
        case 'h': worker_usage(stdout); return 0;
        default: worker_usage(stderr); return 2;
        }
    }
    if (!o.listen || optind < argc) {
        worker_usage(stderr);
        return 2;
    }
    char kerr[256];
    if (attn_dev_known(o.kv_device, kerr, sizeof kerr) != 0) {
        fprintf(stderr, "meshlm worker: --kv-device: %s\n", kerr);
        return 2;
    }
    o.weights = expert_args_provider(&ex, wname, sizeof wname);
    o.expert_skip = ex.skip;
    if ((standby || advertise) && !reg_url) {
        fprintf(stderr, "meshlm worker: --standby and --advertise need --registry\n");
        return 2;
    }
    if (curve_args_load(&ca, "worker", &o.curve) != 0) return 2;
    char err[1024] = "";
    worker_reg_t w = {0};
    int rc = reg_url ? worker_join(&w, &o, reg_url, standby, reg_ttl, advertise, err, sizeof err) : 0;
    if (rc != 0) {
        fprintf(stderr, "meshlm worker: %s\n", err);
        worker_leave(&w);
        return 1;
    }
    if (w.beater) {
        o.on_state = publish_state;
        o.state_arg = &w;
    }
    rc = node_serve(&o, err, sizeof err);
    if (rc != 0) fprintf(stderr, "meshlm worker: %s\n", err);
    worker_leave(&w);
    return rc == 0 ? 0 : 1;
}
