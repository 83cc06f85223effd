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
	/* our own GDT: multiboot leaves GDTR undefined, and an interrupt gate loads CS from it */
	lgdt gdt_desc
	ljmp $0x08, $1f
1:	mov $0x10, %cx
	mov %cx, %ds
	mov %cx, %es
	mov %cx, %fs
	mov %cx, %gs
	mov %cx, %ss
	mov $stack_top, %esp
	push %ebx
	push %eax
	call bb_main
2:	hlt
	jmp 2b

/* The 8259 pair's interrupts (vectors 0x20-0x2f): count the tick, end the interrupt; the loop only waits */
	.globl irq_master, irq_slave
irq_master:
	push %eax
	incl bb_ticks
	mov $0x20, %al
	out %al, $0x20
	pop %eax
	iret
irq_slave:
	push %eax
	mov $0x20, %al
	out %al, $0xa0
	out %al, $0x20
	pop %eax
	iret

	.section .rodata
	.align 8
gdt:
	.quad 0
	.quad 0x00cf9a000000ffff /* 0x08: code, base 0, 4 GiB */
	.quad 0x00cf92000000ffff /* 0x10: data, base 0, 4 GiB */
gdt_desc:
	.word gdt_desc - gdt - 1
	.long gdt

	.bss
	.align 16
	.skip 16384
stack_top:
