/* An LD_PRELOAD library that stands in for a clinic's DNS, for one process (the appliance under
 * test), without a packet leaving the machine.
 *
 * $RESOLVER_HOSTS_FILE holds a state line, "up" or "down", then "name address" lines. A listed
 * name resolves to its address while the state is "up"; while it is "down" getaddrinfo fails
 * with EAI_AGAIN, "Temporary failure in name resolution", which is what it returns when the DNS
 * server cannot be reached (the VPN that leads to it is down). Any other name goes to the real
 * getaddrinfo. The file is read at every call, so a test can switch the state while the
 * process runs. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

typedef int (*getaddrinfo_fn)(const char *, const char *, const struct addrinfo *, struct addrinfo **);

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res) {
    static getaddrinfo_fn real;
    const char *path = getenv("RESOLVER_HOSTS_FILE");
    char state[16] = "", name[256], address[64];
    int found = 0;
    FILE *file;

    if (!real)
        real = (getaddrinfo_fn)dlsym(RTLD_NEXT, "getaddrinfo");
    if (!node || !path || !(file = fopen(path, "r")))
        return real(node, service, hints, res);
    if (fscanf(file, "%15s", state) == 1) {
        while (fscanf(file, "%255s %63s", name, address) == 2) {
            if (strcasecmp(name, node) == 0) {
                found = 1;
                break;
            }
        }
    }
    fclose(file);
    if (!found)
        return real(node, service, hints, res);
    if (strcmp(state, "up") != 0)
        return EAI_AGAIN;
    return real(address, service, hints, res);
}
