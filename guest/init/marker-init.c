/*
 * The guest kit's /init: writes the boot-time marker, then runs the kit's init script
 * (/etc/isla/init, a busybox shell script) and stays PID 1 beside it.
 *
 * Where the host emulates the guest kernel (docs/nested-kvm.md), every process start costs about
 * half a second, so the marker is written by this small program as the first thing user space
 * does, instead of by `mount` and `devmem` started from the script. The marker is Firecracker's
 * boot-time convention: the byte 123 written at guest physical address 0xd0000000 (isla-arch
 * layout.rs), through /dev/mem.
 *
 * On those hosts a freshly started process sometimes dies at its first instruction that reads
 * thread-local storage (docs/nested-kvm.md; the cause and the workaround are below). As PID 1
 * that would panic the kernel; so the script runs as a child, tells this program through file descriptor 3 that it got
 * going (its first line writes a byte there), and is started again, up to three times, if it
 * died before that. Whatever happens later is the script's own doing: when it ends (it normally
 * powers the VM off first), this program exits with its status, as a PID 1 script would have.
 * Meanwhile it reaps orphaned processes.
 *
 * Before that it compares the register state the CPU has enabled for user space (XCR0, read with
 * XGETBV) with the state this kernel saves on task switches (ARCH_GET_XCOMP_SUPP). On nested PVM
 * hosts they differ: user space runs with the host's XCR0 (AVX and AVX-512 on) while the guest
 * kernel, without XSAVE there, saves only x87 and SSE, so AVX and AVX-512 registers pass from one
 * process to the next (docs/nested-kvm.md). Then the script and everything it starts get
 * GLIBC_TUNABLES telling glibc to leave those registers alone in its string and memory functions.
 *
 * No C library: raw system calls, so the program is a few pages that the kernel maps at once.
 * Built by guest/build-initramfs.sh with gcc -static -nostdlib.
 */

#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_mmap 9
#define SYS_dup2 33
#define SYS_fork 57
#define SYS_execve 59
#define SYS_exit 60
#define SYS_wait4 61
#define SYS_arch_prctl 158
#define SYS_mount 165
#define SYS_pipe2 293

#define O_RDWR 02
#define O_CLOEXEC 02000000
#define EINTR 4
#define O_SYNC 04010000
#define PROT_WRITE 2
#define MAP_SHARED 1

#define MARKER_ADDR 0xd0000000L
#define MARKER_VALUE 123
#define START_ATTEMPTS 3
#define ARCH_GET_XCOMP_SUPP 0x1021
/* x87 and SSE: what every x86-64 kernel saves. */
#define XSTATE_FP_SSE 3UL
#define MAX_ENV 62
static const char glibc_no_avx[] =
	"GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-FMA,-FMA4,-F16C,-AVX512F,-AVX512CD,-AVX512DQ,"
	"-AVX512BW,-AVX512VL,-AVX512ER,-AVX512PF,-AVX_Fast_Unaligned_Load";

static long sys6(long n, long a, long b, long c, long d, long e, long f)
{
	long ret;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	register long r9 __asm__("r9") = f;

	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}

static void say(const char *s)
{
	long n = 0;

	while (s[n])
		n++;
	sys6(SYS_write, 2, (long)s, n, 0, 0, 0);
}

static void say_num(const char *before, long n, const char *after)
{
	char digits[24];
	int i = sizeof(digits) - 1;

	digits[i] = 0;
	if (n < 0)
		n = -n;
	do {
		digits[--i] = (char)('0' + n % 10);
		n /= 10;
	} while (n && i > 0);
	say(before);
	say(&digits[i]);
	say(after);
}

/* Register state the CPU lets user space use that this kernel does not save: XCR0 bits outside
 * ARCH_GET_XCOMP_SUPP. */
static unsigned long unsaved_xstate(void)
{
	unsigned int a, b, c, d;
	unsigned long supported = XSTATE_FP_SSE;

	__asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
	if (!(c & (1u << 27))) /* CR4.OSXSAVE clear: no XGETBV, nothing beyond SSE */
		return 0;
	__asm__ volatile("xgetbv" : "=a"(a), "=d"(d) : "c"(0));
	if (sys6(SYS_arch_prctl, ARCH_GET_XCOMP_SUPP, (long)&supported, 0, 0, 0, 0) < 0)
		supported = XSTATE_FP_SSE;
	return (((unsigned long)d << 32 | a) & ~supported);
}

static int starts_with(const char *s, const char *prefix)
{
	while (*prefix)
		if (*s++ != *prefix++)
			return 0;
	return 1;
}

/* envp with glibc_no_avx added (unless GLIBC_TUNABLES is set already), in `out`. */
static char **with_glibc_no_avx(char **envp, char **out)
{
	int n = 0;

	for (; envp[n] && n < MAX_ENV; n++) {
		if (starts_with(envp[n], "GLIBC_TUNABLES="))
			return envp;
		out[n] = envp[n];
	}
	out[n++] = (char *)glibc_no_avx;
	out[n] = 0;
	return out;
}

/* Starts the script with the write end of a pipe as its fd 3; its pid, or a negative error. */
static long start_script(char **envp, long *ready_fd)
{
	char *argv[] = { "sh", "/etc/isla/init", 0 };
	int fds[2];
	long pid;

	if (sys6(SYS_pipe2, (long)fds, O_CLOEXEC, 0, 0, 0, 0) < 0)
		return -1;
	pid = sys6(SYS_fork, 0, 0, 0, 0, 0, 0);
	if (pid == 0) {
		/* dup2 clears close-on-exec on the copy: the script inherits fd 3 only. */
		sys6(SYS_dup2, fds[1], 3, 0, 0, 0, 0);
		sys6(SYS_execve, (long)"/bin/busybox", (long)argv, (long)envp, 0, 0, 0);
		say("isla-init: cannot run /bin/busybox sh /etc/isla/init\n");
		sys6(SYS_exit, 127, 0, 0, 0, 0, 0);
	}
	sys6(SYS_close, fds[1], 0, 0, 0, 0, 0);
	*ready_fd = fds[0];
	return pid;
}

/* Waits for `pid` (reaping any other child meanwhile); its wait status. */
static int wait_for(long pid)
{
	int status = 0;
	long r;

	for (;;) {
		r = sys6(SYS_wait4, -1, (long)&status, 0, 0, 0, 0);
		if (r == pid || (r < 0 && r != -EINTR))
			return status;
	}
}

/* Called from _start with the initial stack: argc, argv[], NULL, envp[], NULL. */
__attribute__((used, noreturn)) static void start(long *sp)
{
	char **envp = (char **)(sp + 1 + sp[0] + 1);
	char *env[MAX_ENV + 2];
	unsigned long unsaved;
	long fd, page, pid = -1, ready_fd = -1, n;
	int attempt, status = 0;
	char byte;

	/* /dev for /dev/mem; on a disk root the kernel has mounted it already (EBUSY). */
	sys6(SYS_mount, (long)"devtmpfs", (long)"/dev", (long)"devtmpfs", 0, 0, 0);
	fd = sys6(SYS_open, (long)"/dev/mem", O_RDWR | O_SYNC, 0, 0, 0, 0);
	page = fd < 0 ? -1 : sys6(SYS_mmap, 0, 4096, PROT_WRITE, MAP_SHARED, fd, MARKER_ADDR);
	if (page < 0 && page > -4096)
		say("isla-init: no boot-timer marker (/dev/mem missing or refused)\n");
	else
		*(volatile unsigned char *)page = MARKER_VALUE;
	if (fd >= 0)
		sys6(SYS_close, fd, 0, 0, 0, 0, 0);

	unsaved = unsaved_xstate();
	if (unsaved) {
		say_num("isla-init: user space has register state the kernel does not save (XCR0 bits ",
			(long)unsaved, "); glibc is told to leave AVX and AVX-512 alone\n");
		envp = with_glibc_no_avx(envp, env);
	}

	for (attempt = 1; attempt <= START_ATTEMPTS; attempt++) {
		pid = start_script(envp, &ready_fd);
		if (pid < 0) {
			say("isla-init: cannot start the init script\n");
			sys6(SYS_exit, 127, 0, 0, 0, 0, 0);
		}
		do
			n = sys6(SYS_read, ready_fd, (long)&byte, 1, 0, 0, 0);
		while (n == -EINTR);
		sys6(SYS_close, ready_fd, 0, 0, 0, 0, 0);
		if (n == 1)
			break;
		/* End of file without the byte: the script died before its first line. */
		status = wait_for(pid);
		pid = -1;
		say_num("isla-init: the init script died as it started (wait status ", status,
			attempt < START_ATTEMPTS ? "); starting it again\n" : "); giving up\n");
	}
	if (pid > 0)
		status = wait_for(pid);
	/* Exit as the script did: a signal's number, or its exit status. */
	sys6(SYS_exit, (status & 0x7f) ? 128 + (status & 0x7f) : (status >> 8) & 0xff, 0, 0, 0, 0, 0);
	for (;;)
		;
}

__asm__(".text\n"
	".global _start\n"
	"_start:\n"
	"	mov %rsp, %rdi\n"
	"	and $-16, %rsp\n"
	"	call start\n");
