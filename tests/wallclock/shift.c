/* An LD_PRELOAD library that steps a process's wall clock, as NTP's first answer or an admin's
 * `date -s` steps a real box's, and leaves its monotonic and boot-time clocks alone, as such a
 * step does.
 *
 * The step, in seconds (a decimal number, negative for back), is read from the file named by
 * $WALLCLOCK_SHIFT_FILE, again at most every 50 ms, so a test can step a running process.
 * Interposes clock_gettime (CLOCK_REALTIME and CLOCK_REALTIME_COARSE), gettimeofday and time. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

#define NS 1000000000LL

static int (*real_clock_gettime)(clockid_t, struct timespec *);
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static long long shift_ns;
static long long next_read_ns;

static void resolve(void) {
    if (!real_clock_gettime)
        real_clock_gettime = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
}

static long long current_shift(void) {
    const char *path = getenv("WALLCLOCK_SHIFT_FILE");
    struct timespec mono;
    long long now, shift;

    if (!path)
        return 0;
    pthread_mutex_lock(&lock);
    real_clock_gettime(CLOCK_MONOTONIC, &mono);
    now = mono.tv_sec * NS + mono.tv_nsec;
    if (now >= next_read_ns) {
        FILE *file = fopen(path, "r");
        double seconds;
        if (file) {
            if (fscanf(file, "%lf", &seconds) == 1)
                shift_ns = (long long)(seconds * 1e9);
            fclose(file);
        }
        next_read_ns = now + NS / 20;
    }
    shift = shift_ns;
    pthread_mutex_unlock(&lock);
    return shift;
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    int result;
    long long t;

    resolve();
    result = real_clock_gettime(id, ts);
    if (result == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) {
        t = ts->tv_sec * NS + ts->tv_nsec + current_shift();
        ts->tv_sec = t / NS;
        ts->tv_nsec = t % NS;
    }
    return result;
}

int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts;

    (void)tz;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0)
        return -1;
    tv->tv_sec = ts.tv_sec;  /* glibc declares tv non-null */
    tv->tv_usec = ts.tv_nsec / 1000;
    return 0;
}

time_t time(time_t *out) {
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    if (out)
        *out = ts.tv_sec;
    return ts.tv_sec;
}
