"""Hardening (issue 11): a test in a container backend gets at most what root has in a
default Docker container.  Applied in a worker after every mount of its root is made
(protect_paths while the root is built, harden_process once the process is in it).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .mounts import MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, bind, check_errno, libc, mount

#: Docker's default capabilities (moby oci/caps): CHOWN DAC_OVERRIDE FOWNER FSETID KILL
#: SETGID SETUID SETPCAP NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP
DEFAULT_CAPS = (0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31)
CAP_SYS_ADMIN = 21
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522
#: runc's defaults: paths masked (an empty read-only tmpfs or /dev/null over them) and
#: paths made read-only in a fresh /proc and /sys
MASKED_PATHS = ("/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
                "/sys/devices/virtual/powercap")
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
                  "/sys")

#: Docker's default seccomp profile (moby profiles/seccomp/default.json) for a container
#: with the default capabilities: the syscalls allowed whatever their arguments.  socket,
#: personality, clone and clone3 are judged by argument (SECCOMP_SPECIAL).
def _words(text: str) -> Tuple[str, ...]:
    return tuple(text.split())


SECCOMP_ALLOW = _words(
    "accept accept4 access adjtimex alarm bind brk capget capset chdir chmod chown "
    "clock_adjtime clock_getres clock_gettime clock_nanosleep close close_range connect "
    "copy_file_range creat dup dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_ctl_old "
    "epoll_pwait epoll_pwait2 epoll_wait epoll_wait_old eventfd eventfd2 execve execveat exit "
    "exit_group faccessat faccessat2 fadvise64 fallocate fanotify_mark fchdir fchmod fchmodat "
    "fchown fchownat fcntl fdatasync fgetxattr flistxattr flock fork fremovexattr fsetxattr "
    "fstat fstatfs fsync ftruncate futex futex_waitv futimesat getcpu getcwd getdents "
    "getdents64 getegid geteuid getgid getgroups getitimer getpeername getpgid getpgrp getpid "
    "getppid getpriority getrandom getresgid getresuid getrlimit get_robust_list getrusage "
    "getsid getsockname getsockopt get_thread_area gettid gettimeofday getuid getxattr "
    "inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel ioctl io_destroy "
    "io_getevents io_pgetevents ioprio_get ioprio_set io_setup io_submit io_uring_enter "
    "io_uring_register io_uring_setup kill landlock_add_rule landlock_create_ruleset "
    "landlock_restrict_self lchown lgetxattr link linkat listen listxattr llistxattr "
    "lremovexattr lseek lsetxattr lstat madvise membarrier memfd_create memfd_secret mincore "
    "mkdir mkdirat mknod mknodat mlock mlock2 mlockall mmap mprotect mq_getsetattr mq_notify "
    "mq_open mq_timedreceive mq_timedsend mq_unlink mremap msgctl msgget msgrcv msgsnd msync "
    "munlock munlockall munmap name_to_handle_at nanosleep newfstatat open openat openat2 "
    "pause pidfd_open pidfd_send_signal pipe pipe2 pkey_alloc pkey_free pkey_mprotect poll "
    "ppoll prctl pread64 preadv preadv2 prlimit64 process_mrelease pselect6 pwrite64 pwritev "
    "pwritev2 read readahead readlink readlinkat readv recvfrom recvmmsg recvmsg "
    "remap_file_pages removexattr rename renameat renameat2 restart_syscall rmdir rseq "
    "rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend "
    "rt_sigtimedwait rt_tgsigqueueinfo sched_getaffinity sched_getattr sched_getparam "
    "sched_get_priority_max sched_get_priority_min sched_getscheduler sched_rr_get_interval "
    "sched_setaffinity sched_setattr sched_setparam sched_setscheduler sched_yield seccomp "
    "select semctl semget semop semtimedop sendfile sendmmsg sendmsg sendto setfsgid setfsuid "
    "setgid setgroups setitimer setpgid setpriority setregid setresgid setresuid setreuid "
    "setrlimit set_robust_list setsid setsockopt set_thread_area set_tid_address setuid "
    "setxattr shmat shmctl shmdt shmget shutdown sigaltstack signalfd signalfd4 socketpair "
    "splice stat statfs statx symlink symlinkat sync sync_file_range syncfs sysinfo tee tgkill "
    "time timer_create timer_delete timer_getoverrun timer_gettime timer_settime "
    "timerfd_create timerfd_gettime timerfd_settime times tkill truncate umask uname unlink "
    "unlinkat utime utimensat utimes vfork vmsplice wait4 waitid write writev "
    # kernel >= 4.8 (Docker allows them there), CAP_SYS_CHROOT, amd64 only
    "process_vm_readv process_vm_writev ptrace chroot arch_prctl modify_ldt"
)
#: What a zygote keeps on top (CAP_SYS_ADMIN: it builds each test worker's root)
SECCOMP_ADMIN = _words("bpf clone clone3 fanotify_init fsconfig fsmount fsopen fspick lookup_dcookie "
                 "mount mount_setattr move_mount open_tree perf_event_open quotactl quotactl_fd "
                 "setdomainname sethostname setns syslog umount2 unshare pivot_root")
SECCOMP_SPECIAL = ("socket", "personality", "clone", "clone3")
#: personality(2) values Docker allows: PER_LINUX, UNAME26, ADDR_NO_RANDOMIZE (both), query
PERSONALITY_ALLOWED = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
AF_VSOCK = 40
#: clone flags that make namespaces (CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET)
CLONE_NAMESPACES = 0x7E020000
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
BPF_LD_W_ABS = 0x20
BPF_JEQ = 0x15
BPF_JGT = 0x25
BPF_JGE = 0x35
BPF_JSET = 0x45
BPF_AND = 0x54
BPF_RET = 0x06
#: offsets in struct seccomp_data (little-endian: an argument's low word comes first)
SECCOMP_NR, SECCOMP_ARCH, SECCOMP_ARG0 = 0, 4, 16
SYSCALL_NUMBERS = {
    "x86_64": (
        "read=0 write=1 open=2 close=3 stat=4 fstat=5 lstat=6 poll=7 lseek=8 mmap=9 mprotect=10 "
        "munmap=11 brk=12 rt_sigaction=13 rt_sigprocmask=14 rt_sigreturn=15 ioctl=16 pread64=17 "
        "pwrite64=18 readv=19 writev=20 access=21 pipe=22 select=23 sched_yield=24 mremap=25 "
        "msync=26 mincore=27 madvise=28 shmget=29 shmat=30 shmctl=31 dup=32 dup2=33 pause=34 "
        "nanosleep=35 getitimer=36 alarm=37 setitimer=38 getpid=39 sendfile=40 socket=41 "
        "connect=42 accept=43 sendto=44 recvfrom=45 sendmsg=46 recvmsg=47 shutdown=48 bind=49 "
        "listen=50 getsockname=51 getpeername=52 socketpair=53 setsockopt=54 getsockopt=55 "
        "clone=56 fork=57 vfork=58 execve=59 exit=60 wait4=61 kill=62 uname=63 semget=64 "
        "semop=65 semctl=66 shmdt=67 msgget=68 msgsnd=69 msgrcv=70 msgctl=71 fcntl=72 flock=73 "
        "fsync=74 fdatasync=75 truncate=76 ftruncate=77 getdents=78 getcwd=79 chdir=80 "
        "fchdir=81 rename=82 mkdir=83 rmdir=84 creat=85 link=86 unlink=87 symlink=88 "
        "readlink=89 chmod=90 fchmod=91 chown=92 fchown=93 lchown=94 umask=95 gettimeofday=96 "
        "getrlimit=97 getrusage=98 sysinfo=99 times=100 ptrace=101 getuid=102 syslog=103 "
        "getgid=104 setuid=105 setgid=106 geteuid=107 getegid=108 setpgid=109 getppid=110 "
        "getpgrp=111 setsid=112 setreuid=113 setregid=114 getgroups=115 setgroups=116 "
        "setresuid=117 getresuid=118 setresgid=119 getresgid=120 getpgid=121 setfsuid=122 "
        "setfsgid=123 getsid=124 capget=125 capset=126 rt_sigpending=127 rt_sigtimedwait=128 "
        "rt_sigqueueinfo=129 rt_sigsuspend=130 sigaltstack=131 utime=132 mknod=133 "
        "personality=135 statfs=137 fstatfs=138 getpriority=140 setpriority=141 "
        "sched_setparam=142 sched_getparam=143 sched_setscheduler=144 sched_getscheduler=145 "
        "sched_get_priority_max=146 sched_get_priority_min=147 sched_rr_get_interval=148 "
        "mlock=149 munlock=150 mlockall=151 munlockall=152 modify_ldt=154 pivot_root=155 "
        "prctl=157 arch_prctl=158 adjtimex=159 setrlimit=160 chroot=161 sync=162 acct=163 "
        "settimeofday=164 mount=165 umount2=166 swapon=167 reboot=169 sethostname=170 "
        "setdomainname=171 iopl=172 ioperm=173 init_module=175 delete_module=176 quotactl=179 "
        "gettid=186 readahead=187 setxattr=188 lsetxattr=189 fsetxattr=190 getxattr=191 "
        "lgetxattr=192 fgetxattr=193 listxattr=194 llistxattr=195 flistxattr=196 "
        "removexattr=197 lremovexattr=198 fremovexattr=199 tkill=200 time=201 futex=202 "
        "sched_setaffinity=203 sched_getaffinity=204 set_thread_area=205 io_setup=206 "
        "io_destroy=207 io_getevents=208 io_submit=209 io_cancel=210 get_thread_area=211 "
        "lookup_dcookie=212 epoll_create=213 epoll_ctl_old=214 epoll_wait_old=215 "
        "remap_file_pages=216 getdents64=217 set_tid_address=218 restart_syscall=219 "
        "semtimedop=220 fadvise64=221 timer_create=222 timer_settime=223 timer_gettime=224 "
        "timer_getoverrun=225 timer_delete=226 clock_settime=227 clock_gettime=228 "
        "clock_getres=229 clock_nanosleep=230 exit_group=231 epoll_wait=232 epoll_ctl=233 "
        "tgkill=234 utimes=235 mq_open=240 mq_unlink=241 mq_timedsend=242 mq_timedreceive=243 "
        "mq_notify=244 mq_getsetattr=245 kexec_load=246 waitid=247 add_key=248 request_key=249 "
        "keyctl=250 ioprio_set=251 ioprio_get=252 inotify_init=253 inotify_add_watch=254 "
        "inotify_rm_watch=255 openat=257 mkdirat=258 mknodat=259 fchownat=260 futimesat=261 "
        "newfstatat=262 unlinkat=263 renameat=264 linkat=265 symlinkat=266 readlinkat=267 "
        "fchmodat=268 faccessat=269 pselect6=270 ppoll=271 unshare=272 set_robust_list=273 "
        "get_robust_list=274 splice=275 tee=276 sync_file_range=277 vmsplice=278 utimensat=280 "
        "epoll_pwait=281 signalfd=282 timerfd_create=283 eventfd=284 fallocate=285 "
        "timerfd_settime=286 timerfd_gettime=287 accept4=288 signalfd4=289 eventfd2=290 "
        "epoll_create1=291 dup3=292 pipe2=293 inotify_init1=294 preadv=295 pwritev=296 "
        "rt_tgsigqueueinfo=297 perf_event_open=298 recvmmsg=299 fanotify_init=300 "
        "fanotify_mark=301 prlimit64=302 name_to_handle_at=303 clock_adjtime=305 syncfs=306 "
        "sendmmsg=307 setns=308 getcpu=309 process_vm_readv=310 process_vm_writev=311 "
        "finit_module=313 sched_setattr=314 sched_getattr=315 renameat2=316 seccomp=317 "
        "getrandom=318 memfd_create=319 bpf=321 execveat=322 membarrier=324 mlock2=325 "
        "copy_file_range=326 preadv2=327 pwritev2=328 pkey_mprotect=329 pkey_alloc=330 "
        "pkey_free=331 statx=332 io_pgetevents=333 rseq=334 pidfd_send_signal=424 "
        "io_uring_setup=425 io_uring_enter=426 io_uring_register=427 open_tree=428 "
        "move_mount=429 fsopen=430 fsconfig=431 fsmount=432 fspick=433 pidfd_open=434 "
        "clone3=435 close_range=436 openat2=437 faccessat2=439 epoll_pwait2=441 "
        "mount_setattr=442 quotactl_fd=443 landlock_create_ruleset=444 landlock_add_rule=445 "
        "landlock_restrict_self=446 memfd_secret=447 process_mrelease=448 futex_waitv=449 "
    ),
    "aarch64": (
        "io_setup=0 io_destroy=1 io_submit=2 io_cancel=3 io_getevents=4 setxattr=5 lsetxattr=6 "
        "fsetxattr=7 getxattr=8 lgetxattr=9 fgetxattr=10 listxattr=11 llistxattr=12 "
        "flistxattr=13 removexattr=14 lremovexattr=15 fremovexattr=16 getcwd=17 "
        "lookup_dcookie=18 eventfd2=19 epoll_create1=20 epoll_ctl=21 epoll_pwait=22 dup=23 "
        "dup3=24 fcntl=25 inotify_init1=26 inotify_add_watch=27 inotify_rm_watch=28 ioctl=29 "
        "ioprio_set=30 ioprio_get=31 flock=32 mknodat=33 mkdirat=34 unlinkat=35 symlinkat=36 "
        "linkat=37 renameat=38 umount2=39 mount=40 pivot_root=41 statfs=43 fstatfs=44 "
        "truncate=45 ftruncate=46 fallocate=47 faccessat=48 chdir=49 fchdir=50 chroot=51 "
        "fchmod=52 fchmodat=53 fchownat=54 fchown=55 openat=56 close=57 pipe2=59 quotactl=60 "
        "getdents64=61 lseek=62 read=63 write=64 readv=65 writev=66 pread64=67 pwrite64=68 "
        "preadv=69 pwritev=70 sendfile=71 pselect6=72 ppoll=73 signalfd4=74 vmsplice=75 "
        "splice=76 tee=77 readlinkat=78 newfstatat=79 fstat=80 sync=81 fsync=82 fdatasync=83 "
        "sync_file_range=84 timerfd_create=85 timerfd_settime=86 timerfd_gettime=87 "
        "utimensat=88 acct=89 capget=90 capset=91 personality=92 exit=93 exit_group=94 "
        "waitid=95 set_tid_address=96 unshare=97 futex=98 set_robust_list=99 "
        "get_robust_list=100 nanosleep=101 getitimer=102 setitimer=103 kexec_load=104 "
        "init_module=105 delete_module=106 timer_create=107 timer_gettime=108 "
        "timer_getoverrun=109 timer_settime=110 timer_delete=111 clock_settime=112 "
        "clock_gettime=113 clock_getres=114 clock_nanosleep=115 syslog=116 ptrace=117 "
        "sched_setparam=118 sched_setscheduler=119 sched_getscheduler=120 sched_getparam=121 "
        "sched_setaffinity=122 sched_getaffinity=123 sched_yield=124 sched_get_priority_max=125 "
        "sched_get_priority_min=126 sched_rr_get_interval=127 restart_syscall=128 kill=129 "
        "tkill=130 tgkill=131 sigaltstack=132 rt_sigsuspend=133 rt_sigaction=134 "
        "rt_sigprocmask=135 rt_sigpending=136 rt_sigtimedwait=137 rt_sigqueueinfo=138 "
        "rt_sigreturn=139 setpriority=140 getpriority=141 reboot=142 setregid=143 setgid=144 "
        "setreuid=145 setuid=146 setresuid=147 getresuid=148 setresgid=149 getresgid=150 "
        "setfsuid=151 setfsgid=152 times=153 setpgid=154 getpgid=155 getsid=156 setsid=157 "
        "getgroups=158 setgroups=159 uname=160 sethostname=161 setdomainname=162 getrlimit=163 "
        "setrlimit=164 getrusage=165 umask=166 prctl=167 getcpu=168 gettimeofday=169 "
        "settimeofday=170 adjtimex=171 getpid=172 getppid=173 getuid=174 geteuid=175 getgid=176 "
        "getegid=177 gettid=178 sysinfo=179 mq_open=180 mq_unlink=181 mq_timedsend=182 "
        "mq_timedreceive=183 mq_notify=184 mq_getsetattr=185 msgget=186 msgctl=187 msgrcv=188 "
        "msgsnd=189 semget=190 semctl=191 semtimedop=192 semop=193 shmget=194 shmctl=195 "
        "shmat=196 shmdt=197 socket=198 socketpair=199 bind=200 listen=201 accept=202 "
        "connect=203 getsockname=204 getpeername=205 sendto=206 recvfrom=207 setsockopt=208 "
        "getsockopt=209 shutdown=210 sendmsg=211 recvmsg=212 readahead=213 brk=214 munmap=215 "
        "mremap=216 add_key=217 request_key=218 keyctl=219 clone=220 execve=221 mmap=222 "
        "fadvise64=223 swapon=224 mprotect=226 msync=227 mlock=228 munlock=229 mlockall=230 "
        "munlockall=231 mincore=232 madvise=233 remap_file_pages=234 rt_tgsigqueueinfo=240 "
        "perf_event_open=241 accept4=242 recvmmsg=243 wait4=260 prlimit64=261 fanotify_init=262 "
        "fanotify_mark=263 name_to_handle_at=264 clock_adjtime=266 syncfs=267 setns=268 "
        "sendmmsg=269 process_vm_readv=270 process_vm_writev=271 finit_module=273 "
        "sched_setattr=274 sched_getattr=275 renameat2=276 seccomp=277 getrandom=278 "
        "memfd_create=279 bpf=280 execveat=281 membarrier=283 mlock2=284 copy_file_range=285 "
        "preadv2=286 pwritev2=287 pkey_mprotect=288 pkey_alloc=289 pkey_free=290 statx=291 "
        "io_pgetevents=292 rseq=293 clock_gettime64=403 clock_adjtime64=405 "
        "clock_getres_time64=406 clock_nanosleep_time64=407 timer_gettime64=408 "
        "timer_settime64=409 timerfd_gettime64=410 timerfd_settime64=411 utimensat_time64=412 "
        "pselect6_time64=413 ppoll_time64=414 io_pgetevents_time64=416 recvmmsg_time64=417 "
        "mq_timedsend_time64=418 mq_timedreceive_time64=419 semtimedop_time64=420 "
        "rt_sigtimedwait_time64=421 futex_time64=422 sched_rr_get_interval_time64=423 "
        "pidfd_send_signal=424 io_uring_setup=425 io_uring_enter=426 io_uring_register=427 "
        "open_tree=428 move_mount=429 fsopen=430 fsconfig=431 fsmount=432 fspick=433 "
        "pidfd_open=434 clone3=435 close_range=436 openat2=437 faccessat2=439 epoll_pwait2=441 "
        "mount_setattr=442 quotactl_fd=443 landlock_create_ruleset=444 landlock_add_rule=445 "
        "landlock_restrict_self=446 memfd_secret=447 process_mrelease=448 futex_waitv=449 "
    ),
}

BpfInsn = Tuple[int, int, int, int]


def syscall_numbers(machine: str) -> Dict[str, int]:
    """name -> number of the syscalls the filter knows, for machine (KeyError: no table)."""
    pairs = (item.split("=") for item in SYSCALL_NUMBERS[machine].split())
    return {name: int(nr) for name, nr in pairs}


def seccomp_program(machine: str, admin: bool = False) -> List[BpfInsn]:
    """The classic-BPF program of the filter (code, jt, jf, k): Docker's default profile,
    every syscall not allowed fails with EPERM (clone3: ENOSYS, so libc uses clone).
    admin: also what a holder of CAP_SYS_ADMIN may do (the zygote's filter)."""
    nrs = syscall_numbers(machine)
    deny = SECCOMP_RET_ERRNO | errno.EPERM
    allow = SECCOMP_RET_ALLOW
    names = set(SECCOMP_ALLOW) | (set(SECCOMP_ADMIN) if admin else set())
    prog: List[BpfInsn] = [
        (BPF_LD_W_ABS, 0, 0, SECCOMP_ARCH),
        (BPF_JEQ, 1, 0, AUDIT_ARCH[machine]),
        (BPF_RET, 0, 0, deny),  # another ABI (i386, x32, arm32): refused
        (BPF_LD_W_ABS, 0, 0, SECCOMP_NR),
    ]
    if machine == "x86_64":
        prog += [(BPF_JGE, 0, 1, X32_SYSCALL_BIT), (BPF_RET, 0, 0, deny)]
    # socket: any family but AF_VSOCK
    prog += [(BPF_JEQ, 0, 4, nrs["socket"]), (BPF_LD_W_ABS, 0, 0, SECCOMP_ARG0),
             (BPF_JEQ, 0, 1, AF_VSOCK), (BPF_RET, 0, 0, deny), (BPF_RET, 0, 0, allow)]
    # personality: the listed values only
    n = len(PERSONALITY_ALLOWED)
    prog += [(BPF_JEQ, 0, n + 3, nrs["personality"]), (BPF_LD_W_ABS, 0, 0, SECCOMP_ARG0)]
    prog += [(BPF_JEQ, n - i, 0, v) for i, v in enumerate(PERSONALITY_ALLOWED)]
    prog += [(BPF_RET, 0, 0, deny), (BPF_RET, 0, 0, allow)]
    if not admin:
        # clone without namespace flags; clone3 (flags out of reach in memory): ENOSYS
        prog += [(BPF_JEQ, 0, 4, nrs["clone"]), (BPF_LD_W_ABS, 0, 0, SECCOMP_ARG0),
                 (BPF_JSET, 1, 0, CLONE_NAMESPACES), (BPF_RET, 0, 0, allow),
                 (BPF_RET, 0, 0, deny)]
        prog += [(BPF_JEQ, 0, 1, nrs["clone3"]),
                 (BPF_RET, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS)]
    wanted = sorted(set(nrs[name] for name in names if name in nrs
                        and (admin or name not in SECCOMP_SPECIAL)))
    ranges: List[List[int]] = []
    for nr in wanted:
        if ranges and ranges[-1][1] == nr - 1:
            ranges[-1][1] = nr
        else:
            ranges.append([nr, nr])
    for lo, hi in ranges:
        if lo == hi:
            prog += [(BPF_JEQ, 0, 1, lo), (BPF_RET, 0, 0, allow)]
        else:
            prog += [(BPF_JGE, 0, 2, lo), (BPF_JGT, 1, 0, hi), (BPF_RET, 0, 0, allow)]
    prog.append((BPF_RET, 0, 0, deny))
    return prog


_PROGRAMS: Dict[Tuple[str, bool], List[BpfInsn]] = {}


def cached_seccomp_program(machine: str, admin: bool = False) -> List[BpfInsn]:
    """seccomp_program, built once per process: a zygote builds the test workers' program
    before it forks them, so each worker only loads it."""
    key = (machine, admin)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = seccomp_program(machine, admin)
    return _PROGRAMS[key]


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _prctl(option: int, *args: int) -> int:
    values = [ctypes.c_ulong(a) for a in args] + [ctypes.c_ulong(0)] * (4 - len(args))
    return int(libc().prctl(ctypes.c_int(option), *values))


def install_seccomp(prog: Sequence[BpfInsn]) -> None:
    """Load prog as this thread's seccomp filter (needs no_new_privs or CAP_SYS_ADMIN)."""
    insns = (_SockFilter * len(prog))(*[_SockFilter(*i) for i in prog])
    fprog = _SockFprog(len(prog), ctypes.cast(insns, ctypes.POINTER(_SockFilter)))
    check_errno(_prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog)),
           "prctl(PR_SET_SECCOMP)")


def _cap_last() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def drop_capabilities(keep: Sequence[int]) -> None:
    """Keep only `keep` in the bounding, effective and permitted sets; empty the
    inheritable and ambient ones (so no execve, not even of a setuid file, gets more)."""
    last = _cap_last()
    for cap in range(last + 1):
        if cap not in keep and _prctl(PR_CAPBSET_READ, cap) == 1:
            check_errno(_prctl(PR_CAPBSET_DROP, cap), "prctl(PR_CAPBSET_DROP, %d)" % cap)
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)  # EINVAL before Linux 4.3: none to clear
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    check_errno(libc().capget(header, data), "capget")
    mask = [0, 0]
    for cap in keep:
        mask[cap // 32] |= 1 << (cap % 32)
    for i in range(2):
        data[3 * i] &= mask[i]  # effective
        data[3 * i + 1] &= mask[i]  # permitted
        data[3 * i + 2] = 0  # inheritable
    check_errno(libc().capset(header, data), "capset")


def protect_paths(root: str) -> None:
    """runc's masked and read-only paths in the fresh /proc and /sys of root (a worker's
    root, before it enters it): what a test reads there is its own, what it could write
    would reach the host's kernel."""
    null = os.path.join(root, "dev/null")
    for path in MASKED_PATHS:
        target = root + path
        if not os.path.lexists(target) or os.path.islink(target):
            continue
        if os.path.isdir(target):
            mount("tmpfs", target, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                  "mode=555,size=4k")
        else:
            mount(null, target, None, MS_BIND)
    for path in READONLY_PATHS:
        target = root + path
        if os.path.lexists(target) and not os.path.islink(target):
            if os.statvfs(target).f_flag & 1 and path == "/sys":
                continue  # mounted read-only already (populate_root)
            bind(target, target, readonly=True)


def harden_process(opts: Dict[str, Any], admin: bool = False) -> List[str]:
    """Capabilities down to Docker's default set, no_new_privs, the seccomp filter.
    admin keeps CAP_SYS_ADMIN and the syscalls it needs (a zygote: it builds each test
    worker's root, whose own hardening then drops the rest).  Returns notes on what the
    kernel or emulator could not do (a filter under qemu-user, an unknown machine)."""
    notes: List[str] = []
    drop_capabilities(DEFAULT_CAPS + ((CAP_SYS_ADMIN,) if admin else ()))
    check_errno(_prctl(PR_SET_NO_NEW_PRIVS, 1), "prctl(PR_SET_NO_NEW_PRIVS)")
    machine = platform.machine()
    if not opts.get("seccomp", True):
        notes.append("no seccomp filter (the host turned it off: emulated architecture)")
    elif machine not in SYSCALL_NUMBERS:
        notes.append("no seccomp filter: no syscall table for %s" % machine)
    else:
        install_seccomp(cached_seccomp_program(machine, admin))
    return notes


def harden_opts(settings: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The hardening a worker applies (None: none, privileged or not a container root)."""
    opts = settings.get("harden")
    if settings.get("isolation") != "overlay" or not isinstance(opts, dict):
        return None
    return opts
