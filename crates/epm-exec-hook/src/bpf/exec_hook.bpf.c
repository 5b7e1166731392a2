// SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause
/*
 * epmd's kernel exec hook (BPF LSM).
 *
 * fanotify gates the file systems epmd has marked. This program sees the
 * rest: every exec open (the program, an ELF interpreter, a script's
 * interpreter) of a file on a superblock or mount epmd has not marked —
 * memfds and other kernel-internal files, private mount namespaces, FUSE,
 * mounts made after epmd looked — and the program a directly run loader
 * (`ld.so PROGRAM`) maps.
 *
 * A BPF program cannot wait for user space, so an exec it has no verdict
 * for is held *before it happens*: the hook sends the process SIGSTOP and
 * fails the exec (or the loader's mmap) with -ERESTARTNOINTR. The process
 * stops on its way back to user space with its old image intact and the
 * system call rewound; epmd decides, stores a verdict for that thread and
 * that file version, and sends SIGCONT; the call runs again and this hook
 * answers it from the verdict. A SIGCONT from anyone else only reruns the
 * call, which is held again: nothing runs before epmd has decided it, and
 * what runs is the file version it decided (the verdict is keyed by
 * device, inode, size, mtime and ctime, and the exec re-checks it after
 * the kernel has denied writers).
 */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "exec_hook.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define SIGSTOP 19
#define EPERM 1
#define EAGAIN 11
#define ENOMEM 12
#define ERESTARTNOINTR 513
#define PROT_EXEC 0x4
#define FMODE_EXEC_FLAG 0x20    /* __FMODE_EXEC in f_flags: an exec open */
#define SB_NOUSER (1UL << 31)   /* a kernel-internal mount (memfd, pipes) */
#define FUSE_SUPER_MAGIC 0x65735546
#define TMPFS_MAGIC 0x01021994
#define F_SEAL_WRITE 0x0008
#define ET_DYN 3
#define PT_INTERP 3

/* Written by the loader before the programs are attached. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct hook_config);
} config SEC(".maps");

/* Execs refused because no event could be written for them. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} unrecorded_refusals SEC(".maps");

static __always_inline const struct hook_config *settings(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&config, &zero);
}

static __always_inline void count_unrecorded(void)
{
	__u32 zero = 0;
	__u64 *count = bpf_map_lookup_elem(&unrecorded_refusals, &zero);
	if (count)
		__sync_fetch_and_add(count, 1);
}

struct {
	__uint(type, BPF_MAP_TYPE_CGROUP_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} scope_cgroup SEC(".maps");

/* Superblocks (s_dev) epmd has marked with FAN_MARK_FILESYSTEM. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u32);
	__type(value, __u8);
} covered_filesystems SEC(".maps");

/* Mounts (mnt_id_unique, never reused) epmd has marked with FAN_MARK_MOUNT. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u64);
	__type(value, __u8);
} covered_mounts SEC(".maps");

/* epmd's verdicts for held execs: 0 to allow, else the negative errno. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct verdict_key);
	__type(value, __s32);
} verdicts SEC(".maps");

/* Execs held right now, per uid. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u32);
} held_per_uid SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} events SEC(".maps");

struct task_state {
	struct file_key held;      /* the file version this thread is held for */
	struct file_key approved;  /* allowed at open; re-checked at bprm_check */
	__u64 loader_ino;          /* the loader this process runs directly */
	__u32 loader_dev;
	__u32 uid;                 /* whose held count `held` is in */
	__u8 holding;
	__u8 held_kind;
	__u8 has_approved;
	__u8 loader_run;           /* ran a loader directly; its program is not mapped yet */
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct task_state);
} tasks SEC(".maps");

extern int bpf_path_d_path(struct path *path, char *buf, size_t buf__sz) __ksym;

static __always_inline bool key_eq(const struct file_key *a, const struct file_key *b)
{
	return a->ino == b->ino && a->dev == b->dev && a->size == b->size &&
	       a->mtime_ns == b->mtime_ns && a->ctime_ns == b->ctime_ns;
}

static __always_inline void read_key(struct file *file, struct file_key *key)
{
	struct inode *inode = BPF_CORE_READ(file, f_inode);
	key->ino = BPF_CORE_READ(inode, i_ino);
	key->dev = BPF_CORE_READ(inode, i_sb, s_dev);
	key->_pad = 0;
	key->size = BPF_CORE_READ(inode, i_size);
	key->mtime_ns = BPF_CORE_READ(inode, i_mtime_sec) * 1000000000LL +
			(BPF_CORE_READ(inode, i_mtime_nsec) & 0x3fffffff);
	/* Bit 31 of the ctime nanoseconds marks "queried" (multigrain
	 * timestamps); stat never shows it. */
	key->ctime_ns = BPF_CORE_READ(inode, i_ctime_sec) * 1000000000LL +
			(BPF_CORE_READ(inode, i_ctime_nsec) & 0x3fffffff);
}

/* Whether this task's execs are the hook's business. */
static __always_inline bool in_scope(struct task_struct *task)
{
	const struct hook_config *cfg = settings();
	if (!cfg || (__u32)(bpf_get_current_pid_tgid() >> 32) == cfg->daemon_tgid)
		return false;
	/* Execs the kernel starts itself (usermode helpers) have no user
	 * space to hold; root configures them. */
	if (!BPF_CORE_READ(task, mm))
		return false;
	if (cfg->scoped && bpf_current_task_under_cgroup(&scope_cgroup, 0) != 1)
		return false;
	return true;
}

/* Whether fanotify (epmd's marks) decides execs of this file. */
static __always_inline bool covered(struct file *file)
{
	struct vfsmount *mnt = BPF_CORE_READ(file, f_path.mnt);
	__u32 dev = BPF_CORE_READ(mnt, mnt_sb, s_dev);
	if (bpf_map_lookup_elem(&covered_filesystems, &dev))
		return true;
	struct mount *mount = container_of(mnt, struct mount, mnt);
	__u64 id = BPF_CORE_READ(mount, mnt_id_unique);
	return bpf_map_lookup_elem(&covered_mounts, &id) != 0;
}

static __always_inline void release_hold(struct task_state *st)
{
	if (!st->holding)
		return;
	st->holding = 0;
	__u32 *count = bpf_map_lookup_elem(&held_per_uid, &st->uid);
	if (count && *count > 0)
		__sync_fetch_and_sub(count, 1);
}

static __always_inline __u32 file_flags(struct file *file)
{
	struct inode *inode = BPF_CORE_READ(file, f_inode);
	struct super_block *sb = BPF_CORE_READ(inode, i_sb);
	unsigned long magic = BPF_CORE_READ(sb, s_magic);
	__u32 flags = 0;
	if (BPF_CORE_READ(file, f_path.mnt, mnt_sb, s_flags) & SB_NOUSER)
		flags |= FLAG_KERNEL_INTERNAL;
	if (magic == FUSE_SUPER_MAGIC)
		flags |= FLAG_FUSE;
	/* A memfd still open for writing and not sealed against it can change
	 * after the decision: the kernel does not deny memfd writers at exec. */
	if ((flags & FLAG_KERNEL_INTERNAL) && magic == TMPFS_MAGIC &&
	    BPF_CORE_READ(inode, i_writecount.counter) > 0) {
		struct shmem_inode_info *info =
			container_of(inode, struct shmem_inode_info, vfs_inode);
		if (!(BPF_CORE_READ(info, seals) & F_SEAL_WRITE))
			flags |= FLAG_WRITABLE;
	}
	return flags;
}

static __always_inline void fill_event(struct exec_event *e, struct file *file,
				       const struct file_key *key, __u32 kind,
				       struct task_struct *task)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u64 uid_gid = bpf_get_current_uid_gid();
	e->kind = kind;
	e->flags = file_flags(file);
	e->tgid = pid_tgid >> 32;
	e->pid = (__u32)pid_tgid;
	e->uid = (__u32)uid_gid;
	e->gid = uid_gid >> 32;
	e->mnt_ns = BPF_CORE_READ(task, nsproxy, mnt_ns, ns.inum);
	e->fs_magic = BPF_CORE_READ(file, f_inode, i_sb, s_magic);
	e->start_time = BPF_CORE_READ(task, start_time);
	e->cgroup_id = bpf_get_current_cgroup_id();
	struct vfsmount *mnt = BPF_CORE_READ(file, f_path.mnt);
	struct mount *mount = container_of(mnt, struct mount, mnt);
	e->mnt_id = BPF_CORE_READ(mount, mnt_id_unique);
	e->file = *key;
	e->path[0] = 0;
	if (bpf_path_d_path(&file->f_path, e->path, sizeof(e->path)) < 0)
		e->flags |= FLAG_PATH_TRUNCATED;
}

/*
 * Holds this exec until epmd has decided it: one event per thread and
 * file version, SIGSTOP to the process, and the call rewound.
 */
static __always_inline int hold(struct file *file, const struct file_key *key,
				struct task_state *st, __u32 kind, struct task_struct *task)
{
	if (st->holding) {
		/* Continued before the verdict (by the user, or a tracer that
		 * dropped the stop): stop again, epmd already knows. */
		if (st->held_kind == kind && key_eq(&st->held, key)) {
			if (bpf_send_signal(SIGSTOP) == 0)
				return -ERESTARTNOINTR;
			return -EPERM;
		}
		release_hold(st);
	}
	__u32 uid = (__u32)bpf_get_current_uid_gid();
	const struct hook_config *cfg = settings();
	__u32 *count = bpf_map_lookup_elem(&held_per_uid, &uid);
	if (!cfg || (count && *count >= cfg->max_held_per_uid)) {
		struct exec_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
		if (!e) {
			count_unrecorded();
			return -EAGAIN;
		}
		fill_event(e, file, key, KIND_REFUSED_FLOOD, task);
		bpf_ringbuf_submit(e, 0);
		return -EAGAIN;
	}
	struct exec_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count_unrecorded();
		return -EAGAIN;
	}
	fill_event(e, file, key, kind, task);
	if (bpf_send_signal(SIGSTOP) != 0) {
		/* pid 1 or a dying task: it cannot be held, and nothing runs
		 * undecided. */
		bpf_ringbuf_discard(e, 0);
		count_unrecorded();
		return -EPERM;
	}
	st->holding = 1;
	st->held = *key;
	st->held_kind = kind;
	st->uid = uid;
	if (count) {
		__sync_fetch_and_add(count, 1);
	} else {
		__u32 one = 1;
		bpf_map_update_elem(&held_per_uid, &uid, &one, BPF_NOEXIST);
	}
	bpf_ringbuf_submit(e, 0);
	return -ERESTARTNOINTR;
}

/* epmd's verdict for this thread and file version, consumed; 1 if none. */
static __always_inline int take_verdict(const struct file_key *key, struct task_struct *task)
{
	struct verdict_key vk = {};
	vk.file = *key;
	vk.pid = (__u32)bpf_get_current_pid_tgid();
	vk.start_time = BPF_CORE_READ(task, start_time);
	__s32 *verdict = bpf_map_lookup_elem(&verdicts, &vk);
	if (!verdict)
		return 1;
	int answer = *verdict;
	bpf_map_delete_elem(&verdicts, &vk);
	return answer;
}

/* Decides an exec open or a loader's program mapping of `file`. */
static __always_inline int judge(struct file *file, __u32 kind, struct task_state *st,
				 struct task_struct *task)
{
	struct file_key key;
	read_key(file, &key);
	int verdict = take_verdict(&key, task);
	if (verdict == 1)
		return hold(file, &key, st, kind, task);
	release_hold(st);
	if (verdict == 0 && kind == KIND_EXEC) {
		st->approved = key;
		st->has_approved = 1;
	}
	return verdict;
}

SEC("lsm/file_open")
int BPF_PROG(exec_open, struct file *file, int ret)
{
	if (ret)
		return ret;
	if (!(BPF_CORE_READ(file, f_flags) & FMODE_EXEC_FLAG))
		return 0;
	struct task_struct *task = bpf_get_current_task_btf();
	if (!in_scope(task) || covered(file))
		return 0;
	struct task_state *st =
		bpf_task_storage_get(&tasks, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!st)
		return -ENOMEM;
	return judge(file, KIND_EXEC, st, task);
}

/* Whether the first bytes of a file (bprm->buf) may be a dynamic loader:
 * an ELF shared object naming no interpreter. Static-pie programs look
 * alike; the cost is that the first file they map executable is decided. */
static __always_inline bool loader_like(struct linux_binprm *bprm)
{
	unsigned char ident[6];
	if (bpf_probe_read_kernel(ident, sizeof(ident), bprm->buf))
		return false;
	if (ident[0] != 0x7f || ident[1] != 'E' || ident[2] != 'L' || ident[3] != 'F')
		return false;
	bool elf64 = ident[4] == 2;
	__u16 type = 0, phentsize = 0, phnum = 0;
	__u64 phoff = 0;
	bpf_probe_read_kernel(&type, 2, bprm->buf + 16);
	if (type != ET_DYN)
		return false;
	if (elf64) {
		bpf_probe_read_kernel(&phoff, 8, bprm->buf + 32);
		bpf_probe_read_kernel(&phentsize, 2, bprm->buf + 54);
		bpf_probe_read_kernel(&phnum, 2, bprm->buf + 56);
	} else {
		__u32 off32 = 0;
		bpf_probe_read_kernel(&off32, 4, bprm->buf + 28);
		phoff = off32;
		bpf_probe_read_kernel(&phentsize, 2, bprm->buf + 42);
		bpf_probe_read_kernel(&phnum, 2, bprm->buf + 44);
	}
	for (int i = 0; i < 8; i++) {
		if (i >= phnum)
			return true;
		__u64 at = phoff + (__u64)i * phentsize;
		if (at + 4 > 256)
			return true; /* beyond what the kernel read: assume a loader */
		__u32 ptype = 0;
		bpf_probe_read_kernel(&ptype, 4, bprm->buf + (at & 0xff));
		if (ptype == PT_INTERP)
			return false;
	}
	return true;
}

SEC("lsm/bprm_check_security")
int BPF_PROG(exec_check, struct linux_binprm *bprm, int ret)
{
	if (ret)
		return ret;
	struct task_struct *task = bpf_get_current_task_btf();
	if (!in_scope(task))
		return 0;
	struct file *file = bprm->file;
	bool loader = loader_like(bprm);
	struct task_state *st = bpf_task_storage_get(&tasks, task, 0,
		loader ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
	if (st) {
		st->loader_run = loader;
		if (loader) {
			st->loader_ino = BPF_CORE_READ(file, f_inode, i_ino);
			st->loader_dev = BPF_CORE_READ(file, f_inode, i_sb, s_dev);
		}
	}
	if (covered(file))
		return 0;
	if (!st) {
		st = bpf_task_storage_get(&tasks, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
		if (!st)
			return -ENOMEM;
	}
	/* The open was allowed; the kernel has denied writers since, so a
	 * file still at that version now stays at it. */
	struct file_key key;
	read_key(file, &key);
	if (st->has_approved && key_eq(&st->approved, &key)) {
		st->has_approved = 0;
		return 0;
	}
	return judge(file, KIND_EXEC, st, task);
}

SEC("lsm/mmap_file")
int BPF_PROG(exec_map, struct file *file, unsigned long reqprot, unsigned long prot,
	     unsigned long flags, int ret)
{
	if (ret)
		return ret;
	if (!file || !(prot & PROT_EXEC))
		return 0;
	struct task_struct *task = bpf_get_current_task_btf();
	struct task_state *st = bpf_task_storage_get(&tasks, task, 0, 0);
	if (!st)
		return 0;
	struct file_key key;
	if (st->has_approved) {
		/* The kernel maps an interpreter it opened: writers are denied
		 * now, so it must still be the version allowed at open. */
		read_key(file, &key);
		if (key.ino == st->approved.ino && key.dev == st->approved.dev) {
			st->has_approved = 0;
			if (!key_eq(&key, &st->approved))
				return -EPERM;
		}
	}
	if (!st->loader_run || !in_scope(task))
		return 0;
	/* The kernel maps the loader itself while exec'ing it. */
	if (BPF_CORE_READ(file, f_inode, i_ino) == st->loader_ino &&
	    BPF_CORE_READ(file, f_inode, i_sb, s_dev) == st->loader_dev)
		return 0;
	/* The first other file a directly run loader maps executable is the
	 * program it runs; later ones are its libraries. */
	int verdict = judge(file, KIND_LOADER_PROGRAM, st, task);
	if (verdict != -ERESTARTNOINTR && verdict != -EAGAIN)
		st->loader_run = 0;
	return verdict;
}

SEC("lsm/task_free")
int BPF_PROG(exec_task_free, struct task_struct *task)
{
	struct task_state *st = bpf_task_storage_get(&tasks, task, 0, 0);
	if (st)
		release_hold(st);
	return 0;
}

SEC("lsm/sb_free_security")
int BPF_PROG(exec_sb_free, struct super_block *sb)
{
	/* A device number is reused by the next superblock: forget it now. */
	__u32 dev = BPF_CORE_READ(sb, s_dev);
	bpf_map_delete_elem(&covered_filesystems, &dev);
	return 0;
}
