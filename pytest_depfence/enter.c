/* depfence-enter: the first program of every fenced command (confine.py, enter.py).
 *
 *     depfence-enter [-c CAP]... [-f FILTER] PROCS... -- FILE ARG...
 *
 * Writes 0 to each PROCS file in order (so this process moves into each cgroup, the
 * fence's last), unshares the cgroup namespace (rooted there), takes each capability
 * CAP (a number) out of its bounding, inheritable and ambient sets (so the command's
 * exec gives it none of them, root or setuid), puts the seccomp filter FILTER (struct
 * sock_filter instructions, in hex: seccomp.py) on itself, then runs FILE ARG... as
 * execvp(3) does: FILE is searched in the PATH of its environment unless it holds a
 * slash, and a file the kernel cannot run (ENOEXEC) runs through /bin/sh. If a step
 * fails, FILE is never run: the reason goes to stderr and the exit status is 126 (127:
 * FILE not found), as util-linux's unshare exits.
 *
 * One exec where the shell step and `unshare --cgroup` took two, and no thread of the
 * owner's to drop the capabilities and take the filter first (confine.start, which the
 * chain still needs). Freestanding (no libc, so it needs no libc6-dev to build and
 * nothing to load at exec): enter.py builds it with the C compiler at first use and
 * keeps it in the user's cache. */

#if defined(__x86_64__)
#define SYS_WRITE 1
#define SYS_CLOSE 3
#define SYS_EXECVE 59
#define SYS_CAPGET 125
#define SYS_CAPSET 126
#define SYS_PRCTL 157
#define SYS_EXIT_GROUP 231
#define SYS_OPENAT 257
#define SYS_UNSHARE 272
#define SYS_SECCOMP 317

static long sys5(long nr, long a, long b, long c, long d, long e)
{
    long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
                     : "rcx", "r11", "memory");
    return ret;
}

__asm__(".text\n.globl _start\n_start:\n"
        "\txor %ebp, %ebp\n\tmov %rsp, %rdi\n\tand $-16, %rsp\n\tcall enter\n\thlt\n");
#elif defined(__aarch64__)
#define SYS_OPENAT 56
#define SYS_CLOSE 57
#define SYS_WRITE 64
#define SYS_CAPGET 90
#define SYS_CAPSET 91
#define SYS_EXIT_GROUP 94
#define SYS_UNSHARE 97
#define SYS_PRCTL 167
#define SYS_EXECVE 221
#define SYS_SECCOMP 277

static long sys5(long nr, long a, long b, long c, long d, long e)
{
    register long x8 __asm__("x8") = nr;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    register long x4 __asm__("x4") = e;
    __asm__ volatile("svc 0"
                     : "+r"(x0)
                     : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4)
                     : "memory");
    return x0;
}

__asm__(".text\n.globl _start\n_start:\n\tmov x0, sp\n\tbl enter\n");
#else
#error "depfence-enter knows x86-64 and arm64; elsewhere fenced commands start through sh"
#endif

#define sys3(nr, a, b, c) sys5(nr, a, b, c, 0, 0)

#define AT_FDCWD -100
#define O_WRONLY 01
#define O_CLOEXEC 02000000
#define CLONE_NEWCGROUP 0x02000000
#define ENOENT 2
#define ENOEXEC 8
#define EACCES 13
#define ENODEV 19
#define ENOTDIR 20
#define ENAMETOOLONG 36
#define ESTALE 116
#define EINVAL 22
#define ETIMEDOUT 110
#define PATH_MAX 4096
#define NAME_MAX 255
#define PR_CAPBSET_DROP 24
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_LOWER 3
#define CAP_LAST 63
#define LINUX_CAPABILITY_VERSION_3 0x20080522
#define SECCOMP_SET_MODE_FILTER 1
#define BPF_MAXINSNS 4096
#define SOCK_FILTER_SIZE 8

static const char *const errno_names[] = {
    [1] = "Operation not permitted",  [2] = "No such file or directory",
    [7] = "Argument list too long",   [8] = "Exec format error",
    [12] = "Cannot allocate memory",  [13] = "Permission denied",
    [16] = "Device or resource busy", [20] = "Not a directory",
    [22] = "Invalid argument",        [26] = "Text file busy",
    [28] = "No space left on device", [36] = "File name too long",
    [40] = "Too many levels of symbolic links",
};

static unsigned long length(const char *s)
{
    unsigned long n = 0;
    while (s[n])
        n++;
    return n;
}

static void say(const char *s) { sys3(SYS_WRITE, 2, (long)s, (long)length(s)); }

static void say_errno(long err)
{
    const char *name = 0;
    char digits[24];
    int i = sizeof(digits) - 1;
    if (err > 0 && err < (long)(sizeof(errno_names) / sizeof(errno_names[0])))
        name = errno_names[err];
    if (name) {
        say(name);
        return;
    }
    digits[i] = 0;
    do
        digits[--i] = (char)('0' + err % 10);
    while ((err /= 10) > 0 && i > 0);
    say("errno ");
    say(digits + i);
}

/* Says why and exits: 127 when the command is not there, 126 for every other failure. */
static void __attribute__((noreturn)) fail(const char *what, const char *name, long err,
                                           int status)
{
    say("depfence-enter: ");
    say(what);
    say(name);
    if (err) {
        say(": ");
        say_errno(err);
    }
    say("\n");
    sys3(SYS_EXIT_GROUP, status, 0, 0);
    __builtin_unreachable();
}

/* execve(path); on ENOEXEC, as glibc: /bin/sh path ARG... Returns the error (> 0). */
static long run(const char *path, char **argv, char **envp)
{
    long err = -sys3(SYS_EXECVE, (long)path, (long)argv, (long)envp);
    if (err == ENOEXEC) {
        int argc = 0;
        while (argv[argc])
            argc++;
        char *script[argc + 2];
        script[0] = "/bin/sh";
        script[1] = (char *)path;
        for (int i = 1; i <= argc; i++)
            script[i + 1] = argv[i];
        sys3(SYS_EXECVE, (long)script[0], (long)script, (long)envp);
    }
    return err;
}

/* glibc's __execvpe: each PATH entry in turn (empty: the working directory); EACCES is
 * remembered and the search goes on, as it does past a missing file or directory. */
static long search(const char *file, char **argv, char **envp)
{
    const char *path = "/bin:/usr/bin";
    unsigned long file_len = length(file);
    char buf[PATH_MAX + NAME_MAX + 2];
    int eacces = 0;

    if (file_len == 0)
        return ENOENT;
    for (int i = 0; file[i]; i++)
        if (file[i] == '/')
            return run(file, argv, envp);
    if (file_len > NAME_MAX)
        return ENAMETOOLONG;
    for (char **e = envp; *e; e++) {
        const char *v = *e;
        if (v[0] == 'P' && v[1] == 'A' && v[2] == 'T' && v[3] == 'H' && v[4] == '=') {
            path = v + 5;
            break;
        }
    }
    for (const char *p = path;; p++) {
        const char *start = p;
        unsigned long n = 0, dir_len;
        while (*p && *p != ':')
            p++;
        dir_len = (unsigned long)(p - start);
        if (dir_len <= PATH_MAX) {
            for (; n < dir_len; n++)
                buf[n] = start[n];
            if (dir_len)
                buf[n++] = '/';
            for (unsigned long k = 0; k <= file_len; k++)
                buf[n + k] = file[k];
            long err = run(buf, argv, envp);
            if (err == EACCES)
                eacces = 1;
            else if (err != ENOENT && err != ESTALE && err != ENOTDIR && err != ENODEV &&
                     err != ETIMEDOUT)
                return err;
        }
        if (!*p)
            return eacces ? EACCES : ENOENT;
    }
}

struct cap_header {
    unsigned int version;
    int pid;
};

struct cap_data {
    unsigned int effective, permitted, inheritable;
};

/* Out of the bounding and inheritable sets, and the ambient one (EINVAL: a kernel before
 * 4.3 has none), as `setpriv --bounding-set -CAP --inh-caps -CAP --ambient-caps -CAP`. */
static void drop(const char *name, long cap)
{
    struct cap_header header = {LINUX_CAPABILITY_VERSION_3, 0};
    struct cap_data data[2];
    long err = -sys5(SYS_PRCTL, PR_CAPBSET_DROP, cap, 0, 0, 0);
    if (err > 0)
        fail("cannot take out of the bounding set the capability ", name, err, 126);
    err = -sys3(SYS_CAPGET, (long)&header, (long)data, 0);
    if (err <= 0 && (data[cap / 32].inheritable & (1u << (cap % 32)))) {  /* mostly not */
        data[cap / 32].inheritable &= ~(1u << (cap % 32));
        err = -sys3(SYS_CAPSET, (long)&header, (long)data, 0);
    }
    if (err > 0)
        fail("cannot take out of the inheritable set the capability ", name, err, 126);
    err = -sys5(SYS_PRCTL, PR_CAP_AMBIENT, PR_CAP_AMBIENT_LOWER, cap, 0, 0);
    if (err > 0 && err != EINVAL)
        fail("cannot take out of the ambient set the capability ", name, err, 126);
}

/* A capability's number, 0 to CAP_LAST; -1 when `s` is not one. */
static long capability(const char *s)
{
    long cap = 0;
    if (!*s)
        return -1;
    for (; *s; s++) {
        if (*s < '0' || *s > '9' || (cap = cap * 10 + (*s - '0')) > CAP_LAST)
            return -1;
    }
    return cap;
}

static unsigned char filter[BPF_MAXINSNS * SOCK_FILTER_SIZE] __attribute__((aligned(8)));

static int nibble(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* FILTER (at most twice `filter`'s size) into `filter`: its instruction count, or 0 when
 * it is not whole instructions in lower-case hex. */
static unsigned long unhex(const char *s)
{
    unsigned long n = 0;
    for (; s[0]; s += 2, n++) {
        int high = nibble(s[0]), low = high < 0 ? -1 : nibble(s[1]);
        if (low < 0)
            return 0;
        filter[n] = (unsigned char)(high << 4 | low);
    }
    return n % SOCK_FILTER_SIZE ? 0 : n / SOCK_FILTER_SIZE;
}

struct sock_fprog {
    unsigned short len;
    unsigned char *filter;
};

void __attribute__((noreturn, used)) enter(long *sp)
{
    int argc = (int)sp[0];
    char **argv = (char **)(sp + 1);
    char **envp = argv + argc + 1;
    const char *caps[CAP_LAST + 1] = {0};
    struct sock_fprog fprog = {0, filter};
    int i = 1;

    for (; i + 1 < argc && argv[i][0] == '-' && (argv[i][1] == 'c' || argv[i][1] == 'f') &&
           !argv[i][2];
         i += 2) {
        if (argv[i][1] == 'c') {
            long cap = capability(argv[i + 1]);
            if (cap < 0)
                fail("not a capability number: ", argv[i + 1], 0, 126);
            caps[cap] = argv[i + 1];
        } else if (length(argv[i + 1]) > 2 * sizeof(filter)) {
            fail("a seccomp filter of more than 4096 instructions", "", 0, 126);
        } else if (!(fprog.len = (unsigned short)unhex(argv[i + 1]))) {
            fail("not a seccomp filter (whole instructions in hex): ", argv[i + 1], 0, 126);
        }
    }
    for (; i < argc && !(argv[i][0] == '-' && argv[i][1] == '-' && !argv[i][2]); i++) {
        long fd = sys3(SYS_OPENAT, AT_FDCWD, (long)argv[i], O_WRONLY | O_CLOEXEC);
        long wrote = fd < 0 ? fd : sys3(SYS_WRITE, fd, (long)"0", 1);
        if (wrote < 0)
            fail("cannot enter the cgroup of ", argv[i], -wrote, 126);
        sys3(SYS_CLOSE, fd, 0, 0);
    }
    if (i + 1 >= argc)
        fail("usage: depfence-enter [-c CAP]... [-f FILTER] PROCS... -- FILE ARG...", "", 0,
             126);
    long err = -sys3(SYS_UNSHARE, CLONE_NEWCGROUP, 0, 0);
    if (err > 0)
        fail("cannot unshare the cgroup namespace", "", err, 126);
    for (long cap = 0; cap <= CAP_LAST; cap++)
        if (caps[cap])
            drop(caps[cap], cap);
    if (fprog.len) {
        err = -sys3(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, 0, (long)&fprog);
        if (err > 0)
            fail("cannot install the seccomp filter", "", err, 126);
    }
    err = search(argv[i + 1], argv + i + 1, envp);
    fail("failed to execute ", argv[i + 1], err, err == ENOENT ? 127 : 126);
}
