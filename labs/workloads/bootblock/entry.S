/* Multiboot (v1) entry: the loader (QEMU -kernel, libvirt <os><kernel>) enters here in 32-bit
 * protected mode with flat segments and paging off, %eax = magic, %ebx = multiboot info. */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000002 /* ask for the memory fields (mem_lower, mem_upper) */

	.section .multiboot, "a"
	.align 4
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)

	.text
	.globl _start
_start:
	cli
	mov $stack_top, %esp
	push %ebx
	push %eax
	call bb_main
1:	hlt
	jmp 1b

	.bss
	.align 16
	.skip 16384
stack_top:
