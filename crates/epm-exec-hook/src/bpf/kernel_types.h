/* SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause */
/*
 * The few kernel types the exec hook reads, declared with only the fields
 * it uses. preserve_access_index makes every access a CO-RE relocation:
 * libbpf finds each field's real offset in the running kernel's BTF at
 * load time, so this header never has to match a kernel's layout, and a
 * field the kernel lacks is a clear load error rather than a wrong read.
 */
#ifndef EPM_KERNEL_TYPES_H
#define EPM_KERNEL_TYPES_H

#include <linux/types.h>
#include <linux/bpf.h>

typedef __u8 u8;
typedef __u16 u16;
typedef __u32 u32;
typedef __u64 u64;
typedef __s32 s32;
typedef __s64 s64;
typedef _Bool bool;
typedef unsigned long size_t;
#define true 1
#define false 0

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

typedef struct { u32 val; } kuid_t;
typedef struct { u32 val; } kgid_t;
typedef struct { int counter; } atomic_t;

struct super_block {
	u32 s_dev;
	unsigned long s_flags;
	unsigned long s_magic;
};

struct inode {
	struct super_block *i_sb;
	unsigned long i_ino;
	long long i_size;
	s64 i_mtime_sec;
	s64 i_ctime_sec;
	u32 i_mtime_nsec;
	u32 i_ctime_nsec;
	atomic_t i_writecount;
};

struct shmem_inode_info {
	unsigned int seals;
	struct inode vfs_inode;
};

struct dentry;

struct vfsmount {
	struct super_block *mnt_sb;
};

struct mount {
	struct vfsmount mnt;
	u64 mnt_id_unique;
};

struct path {
	struct vfsmount *mnt;
	struct dentry *dentry;
};

struct file {
	struct inode *f_inode;
	unsigned int f_flags;
	struct path f_path;
};

struct linux_binprm {
	struct file *file;
	char buf[256];
};

struct ns_common {
	unsigned int inum;
};

struct mnt_namespace {
	struct ns_common ns;
};

struct nsproxy {
	struct mnt_namespace *mnt_ns;
};

struct mm_struct;

struct cred {
	kuid_t uid;
	kgid_t gid;
};

struct task_struct {
	int pid;
	int tgid;
	u64 start_time;
	struct mm_struct *mm;
	struct nsproxy *nsproxy;
	const struct cred *cred;
};

#pragma clang attribute pop

#endif
