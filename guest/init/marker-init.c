/*
 * The guest kit's /init: writes the boot-time marker, then runs the kit's init script
 * (/etc/isla/init, a busybox shell script) in its place.
 *
 * Where the host emulates the guest kernel (docs/nested-kvm.md), every process start costs about
 * half a second, so the marker is written by this small program as the first thing user space
 * does, instead of by `mount` and `devmem` started from the script. The marker is Firecracker's
 * boot-timer convention: the byte 123 written at guest physical address 0xd0000000 (isla-arch
 * layout.rs), through /dev/mem.
 *
 * No C library: raw system calls, so the program is a few pages that the kernel maps at once.
 * Built by guest/build-initramfs.sh with gcc -static -nostdlib.
 */

#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_mmap 9
#define SYS_execve 59
#define SYS_exit 60
#define SYS_mount 165

#define O_RDWR 02
#define O_SYNC 04010000
#define PROT_WRITE 2
#define MAP_SHARED 1

#define MARKER_ADDR 0xd0000000L
#define MARKER_VALUE 123

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

/* Called from _start with the initial stack: argc, argv[], NULL, envp[], NULL. */
__attribute__((used, noreturn)) static void start(long *sp)
{
	char **envp = (char **)(sp + 1 + sp[0] + 1);
	char *argv[] = { "sh", "/etc/isla/init", 0 };
	long fd, page;

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
	sys6(SYS_execve, (long)"/bin/busybox", (long)argv, (long)envp, 0, 0, 0);
	say("isla-init: cannot run /bin/busybox sh /etc/isla/init\n");
	sys6(SYS_exit, 127, 0, 0, 0, 0, 0);
	for (;;)
		;
}

__asm__(".text\n"
	".global _start\n"
	"_start:\n"
	"	mov %rsp, %rdi\n"
	"	and $-16, %rsp\n"
	"	call start\n");
