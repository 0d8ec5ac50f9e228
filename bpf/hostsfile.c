/* Syscall exits (syscalls.c): a fenced process that writes a hosts file the fence
 * has read, or gives a file the name hosts, is paused as mounts.c pauses it.
 *
 * A script with its own hosts file (unshare -m; mount --bind ...) is paused at the
 * mount and the file read then; what it appends afterwards (`echo ADDR name >>
 * /etc/hosts; curl http://name/`) must be read before it can connect. So:
 *
 * - writes: when write, pwrite64, writev, pwritev, pwritev2, ftruncate, sendfile,
 *   copy_file_range or splice succeeds on a descriptor whose file is in
 *   `hosts_files` (the inodes userspace read as hosts files: the machine's at a
 *   run's start, each process's after a view change or a pause here), the process
 *   is stopped and userspace re-reads that file (/proc/<pid>/fd/<fd>) and the one
 *   the process sees as /etc/hosts. Keyed by inode, so a descriptor that was
 *   inherited or dup'd (`cat >> /etc/hosts` writes to the shell's fd 1) or opened
 *   through the bind mount's source path is caught too.
 * - names: when open, creat, openat or openat2 for writing, or rename*, link* or
 *   symlink* succeeds and the new name's last component is `hosts` (sed -i and
 *   editors write a new file and rename it over; `rm; echo > /etc/hosts` makes a
 *   new inode), or `etc` for the last three (a whole directory swapped in), the
 *   process is stopped and userspace re-reads what it sees as /etc/hosts, whose
 *   inode then joins `hosts_files`.
 *
 * Not seen: writes through a shared mapping (mmap) or io_uring, writes by a
 * process outside the fence (the fenced process that connects afterwards is not
 * paused: the new line is read at the next pause or run), a hosts file NSS is told
 * to find elsewhere, a parent directory of /etc renamed. A new name too long to read
 * whole (PATH_BUF) pauses the process: it cannot be told from hosts.
 *
 * Every write on the machine comes through here, and most are not a fenced
 * process's: a failed call, then the fence, are checked before anything else is read.
 *
 * Helpers (program type BPF_PROG_TYPE_RAW_TRACEPOINT), first kernel for this type:
 *   bpf_get_current_task        4.8
 *   bpf_probe_read_kernel       5.5 (fence.h kernel_u64)
 *   bpf_probe_read_user         5.5
 *   bpf_probe_read_user_str     5.5
 *   (and those of mounts.c: pause_to_look)
 * The descriptor's file is found with struct offsets read from the running kernel's
 * BTF (kernel/tracing.py FD_FIELDS); without them (DEPFENCE_NO_FD_INODE) writes
 * through a descriptor are not looked at, and names still are.
 * openat2 exists from 5.6, copy_file_range from 4.5, pwritev2 from 4.6: an older
 * kernel just never makes those syscalls.
 */

/* A file as the kernel names it: inode->i_sb->s_dev (the kernel's dev_t: major << 20 |
 * minor, as /proc/<pid>/mountinfo prints it) and inode->i_ino. */
struct file_key {
    __u64 ino;
    __u32 dev;
    __u32 pad;
};

/* The hosts files the fence has read (kernel/programs.py watch_hosts_file): any value. */
BPF_HASH(hosts_files, struct file_key, __u32, 1024);

#ifndef DEPFENCE_NO_FD_INODE
/* Whether descriptor `fd` of the current task is a file in `hosts_files`:
 * task->files->fdt->fd[fd]->f_inode. The fd table is read without its RCU lock, as any
 * probe read is: a table being resized reads as the old one, which still holds fd. */
static __always_inline int is_hosts_fd(__u64 fd)
{
    __u64 files = kernel_u64(bpf_get_current_task() + DEPFENCE_OFF_TASK_FILES);
    if (!files)
        return 0;
    __u64 fdt = kernel_u64(files + DEPFENCE_OFF_FILES_FDT);
    if (!fdt)
        return 0;
    __u32 max_fds = 0;
    bpf_probe_read_kernel(&max_fds, sizeof(max_fds), (void *)(fdt + DEPFENCE_OFF_FDTABLE_MAX_FDS));
    if (fd >= max_fds)
        return 0;
    __u64 file = kernel_u64(kernel_u64(fdt + DEPFENCE_OFF_FDTABLE_FD) + fd * sizeof(__u64));
    if (!file)
        return 0;
    __u64 inode = kernel_u64(file + DEPFENCE_OFF_FILE_INODE);
    if (!inode)
        return 0;
    struct file_key key = {};
    key.ino = kernel_u64(inode + DEPFENCE_OFF_INODE_INO);
    bpf_probe_read_kernel(&key.dev, sizeof(key.dev),
                          (void *)(kernel_u64(inode + DEPFENCE_OFF_INODE_SB) + DEPFENCE_OFF_SB_DEV));
    return hosts_files.lookup(&key) != 0;
}
#endif

/* A write-like syscall of a process of fence `cgid` into descriptor `fd` succeeded. */
static __always_inline int hosts_written(__u64 cgid, __u64 fd)
{
#ifdef DEPFENCE_NO_FD_INODE
    return 0;
#else
    return is_hosts_fd(fd) ? pause_to_look(cgid, (__s32)fd) : 0;
#endif
}

#define PATH_BUF 256
#define PATH_AT(i) buf->s[(i) & (PATH_BUF - 1)]

struct path_buf {
    char s[PATH_BUF];
};
BPF_PERCPU_ARRAY(path_scratch, struct path_buf, 1);

/* Whether the path at `path` (user memory) ends in the component hosts (or, with
 * `etc`, the component etc). A path too long to read whole counts as one. */
static __always_inline int names_hosts(const char *path, int etc)
{
    int zero = 0;
    struct path_buf *buf = path_scratch.lookup(&zero);
    if (!buf)
        return 0;
    long n = read_user_str(buf->s, sizeof(buf->s), path);
    if (n <= 0)
        return 0;  /* the call succeeded, so the name was readable: it is gone (another thread) */
    if (n >= PATH_BUF)
        return 1;
    __u32 end = (__u32)(n - 1);  /* the length, without the NUL */
    if (end >= 5 && PATH_AT(end - 5) == 'h' && PATH_AT(end - 4) == 'o' &&
        PATH_AT(end - 3) == 's' && PATH_AT(end - 2) == 't' && PATH_AT(end - 1) == 's' &&
        (end == 5 || PATH_AT(end - 6) == '/'))
        return 1;
    return etc && end >= 3 && PATH_AT(end - 3) == 'e' && PATH_AT(end - 2) == 't' &&
           PATH_AT(end - 1) == 'c' && (end == 3 || PATH_AT(end - 4) == '/');
}

/* open/creat/openat/openat2 of a process of fence `cgid` opened `path` with `flags`. */
#define OPEN_WRITES 03 /* O_WRONLY | O_RDWR */
#define OPEN_MAKES 01100 /* O_CREAT | O_TRUNC */
static __always_inline int hosts_opened(__u64 cgid, const char *path, __u64 flags)
{
    if (!(flags & (OPEN_WRITES | OPEN_MAKES)) || !names_hosts(path, 0))
        return 0;
    return pause_to_look(cgid, -1);
}

/* rename*, link*, symlink* of a process of fence `cgid` made the name at `path`. */
static __always_inline int hosts_named(__u64 cgid, const char *path)
{
    return names_hosts(path, 1) ? pause_to_look(cgid, -1) : 0;
}

/* The flags of openat2's struct open_how (its first member, a __u64). */
static __always_inline __u64 open_how_flags(__u64 how)
{
    __u64 flags = 0;
    read_user(&flags, sizeof(flags), (void *)how);
    return flags;
}
