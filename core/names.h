// Named constructors: a small thread-safe table of name -> function, for the pluggable devices and providers.
#ifndef MESHLM_NAMES_H
#define MESHLM_NAMES_H

#include <pthread.h>
#include <stddef.h>

#define MLM_NAMES_MAX 16
#define MLM_NAME_LEN 32

typedef void (*mlm_name_fn)(void); // any constructor, cast back by the table's owner

typedef struct {
    struct {
        char name[MLM_NAME_LEN];
        mlm_name_fn make;
    } e[MLM_NAMES_MAX];
    int n;                                         // entries in use
    pthread_mutex_t lock;
    char list[MLM_NAMES_MAX * (MLM_NAME_LEN + 1)]; // the names, space-separated
} mlm_names_t;

// A table holding built-ins, e.g. `static mlm_names_t t = MLM_NAMES_INIT(2, {"a", fa}, {"b", fb});`
// (the functions cast to mlm_name_fn).
#define MLM_NAMES_INIT(count, ...) {{__VA_ARGS__}, (count), PTHREAD_MUTEX_INITIALIZER, {0}}

// Adds name -> make: 0, MLM_EINVAL (empty, longer than 31 bytes, with a ':' or no function), MLM_ESTATE
// (the name is taken) or MLM_EFULL (MLM_NAMES_MAX entries).
int mlm_names_add(mlm_names_t *t, const char *name, mlm_name_fn make);

// The function registered as the first len bytes of name, or NULL.
mlm_name_fn mlm_names_find(mlm_names_t *t, const char *name, size_t len);

// The names, space-separated (owned by the table; changes only when a name is added).
const char *mlm_names_list(mlm_names_t *t);

#endif
