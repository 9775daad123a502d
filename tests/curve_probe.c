// curve_probe: a third process that knocks on a CurveZMQ port with a key pair and reports whether it was admitted.
// Usage: curve_probe KEYFILE SERVER_PUBLIC_KEY ENDPOINT. It connects a DEALER presenting the key pair
// of KEYFILE (a meshlm keygen .key file) to the CURVE server at ENDPOINT that holds SERVER_PUBLIC_KEY,
// sends nothing, and prints the first handshake event within 5 s: "admitted" (exit 0), "refused" (its
// key was refused, exit 1), "failed" (another handshake failure, exit 2) or "silent" (none, exit 3).
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <zmq.h>

#define KEY_LEN 40 // Z85 text of a key

// Reads "public KEY" and "secret KEY" lines of path into pub and sec (KEY_LEN + 1 each). 0 or -1.
static int read_keys(const char *path, char *pub, char *sec) {
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    char line[256];
    pub[0] = sec[0] = 0;
    while (fgets(line, sizeof line, f)) {
        char *dst = !strncmp(line, "public ", 7) ? pub : !strncmp(line, "secret ", 7) ? sec : NULL;
        if (dst && strlen(line + 7) >= KEY_LEN) {
            memcpy(dst, line + 7, KEY_LEN);
            dst[KEY_LEN] = 0;
        }
    }
    fclose(f);
    return pub[0] && sec[0] ? 0 : -1;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: curve_probe KEYFILE SERVER_PUBLIC_KEY ENDPOINT\n");
        return 64;
    }
    char pub[KEY_LEN + 1], sec[KEY_LEN + 1];
    if (read_keys(argv[1], pub, sec) != 0 || strlen(argv[2]) != KEY_LEN) {
        fprintf(stderr, "curve_probe: %s: no key pair, or the server key is not 40 characters\n", argv[1]);
        return 64;
    }
    void *ctx = zmq_ctx_new(), *s = zmq_socket(ctx, ZMQ_DEALER), *mon = zmq_socket(ctx, ZMQ_PAIR);
    const int zero = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(s, ZMQ_CURVE_SERVERKEY, argv[2], KEY_LEN);
    zmq_setsockopt(s, ZMQ_CURVE_PUBLICKEY, pub, KEY_LEN);
    zmq_setsockopt(s, ZMQ_CURVE_SECRETKEY, sec, KEY_LEN);
    zmq_socket_monitor(s, "inproc://probe", ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH |
                                                ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL);
    zmq_connect(mon, "inproc://probe");
    int rc = 3;
    if (zmq_connect(s, argv[3]) == 0) {
        zmq_pollitem_t it = {mon, 0, ZMQ_POLLIN, 0};
        uint8_t head[6];
        char addr[256];
        if (zmq_poll(&it, 1, 5000) > 0 && zmq_recv(mon, head, sizeof head, 0) == 6 &&
            zmq_recv(mon, addr, sizeof addr, 0) >= 0) {
            uint16_t e;
            memcpy(&e, head, 2);
            rc = e == ZMQ_EVENT_HANDSHAKE_SUCCEEDED ? 0 : e == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH ? 1 : 2;
        }
    }
    static const char *const said[] = {"admitted", "refused", "failed", "silent"};
    printf("%s\n", said[rc]);
    zmq_socket_monitor(s, NULL, 0);
    zmq_close(mon);
    zmq_close(s);
    zmq_ctx_term(ctx);
    return rc;
}
