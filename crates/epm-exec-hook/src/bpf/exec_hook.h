/* SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause */
/*
 * What the exec hook and epmd share: the event layout and the constants.
 * src/event.rs mirrors it (#[repr(C)]); the program publishes the size it
 * was built with (event_size) and the loader refuses a mismatch.
 */
#ifndef EPM_EXEC_HOOK_H
#define EPM_EXEC_HOOK_H

#define HOOK_PATH_MAX 512

/* One version of one file: what a verdict binds. */
struct file_key {
	__u64 ino;
	__u32 dev;       /* the kernel's s_dev: major << 20 | minor */
	__u32 _pad;
	__s64 size;
	__s64 mtime_ns;
	__s64 ctime_ns;
};

/* A verdict for one held exec: the file version, the thread and its start. */
struct verdict_key {
	struct file_key file;
	__u32 pid;
	__u32 _pad;
	__u64 start_time;
};

/* The loader's settings (the `config` map's one entry). */
struct hook_config {
	__u32 daemon_tgid;      /* epmd's own execs are fanotify's */
	__u32 scoped;           /* 1: only tasks under the cgroup in scope_cgroup */
	__u32 max_held_per_uid; /* more held execs are refused with EAGAIN */
	__u32 _pad;
};

/* event.kind */
#define KIND_EXEC 1           /* an exec (or interpreter) open, held */
#define KIND_LOADER_PROGRAM 2 /* the program a directly run loader maps, held */
#define KIND_REFUSED_FLOOD 3  /* refused: this uid already has too many held */

/* event.flags */
#define FLAG_KERNEL_INTERNAL 1 /* on a kernel-internal mount (memfd) */
#define FLAG_FUSE 2            /* served by a FUSE process */
#define FLAG_WRITABLE 4        /* someone can still write it (memfd unsealed) */
#define FLAG_PATH_TRUNCATED 8  /* d_path failed or did not fit */

struct exec_event {
	__u32 kind;
	__u32 flags;
	__u32 tgid;
	__u32 pid;
	__u32 uid;
	__u32 gid;
	__u32 mnt_ns;
	__u32 fs_magic;
	__u64 start_time;
	__u64 cgroup_id;
	__u64 mnt_id;
	struct file_key file;
	char path[HOOK_PATH_MAX];
};

#endif
