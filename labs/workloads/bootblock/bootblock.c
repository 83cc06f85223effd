/*
 * bootblock: a guest-OS-free workload for device migration tests.
 *
 * Loaded by multiboot (v1). Forever: dirties a span of RAM at a set rate (every migration has
 * pre-copy work), runs a loopback exerciser on every port of every mtty function it finds on PCI
 * (bytes written to THR come back from RBR through mtty's FIFO, which is in mtty's migration
 * stream; the FIFO holds `depth` bytes nearly all the time), and publishes what it saw in a
 * mailbox at a fixed guest-physical address that the host reads through the QEMU monitor.
 * The layout is mirrored in labs/workloads/mailbox.py (a test compares the two).
 *
 * Command line (libvirt <cmdline>): dirty_mib=N rate_mib=N depth=N, decimal.
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define MAILBOX_MAGIC 0x4b42424cu /* "LBBK" */
#define MAILBOX_VERSION 1u
#define MAX_PORTS 8
#define MAX_GAPS 8

#define STATUS_BOOTING 1u
#define STATUS_RUNNING 2u

#define ERR_MISMATCH 1u /* a byte came back other than the one sent */
#define ERR_STALL 2u	/* bytes were in flight but the port had none ready: the FIFO lost them */
#define ERR_BAR 3u	/* an mtty function whose I/O BAR nobody assigned */

#define MTTY_ID 0x32534348u /* device 0x3253, vendor 0x4348 */
#define DIRTY_BASE 0x400000u /* above this image, the multiboot info and the command line */

struct port_stats {
	u32 io_base;
	u32 bdf;
	u64 sent;
	u64 received;
	u64 mismatched;
	u64 stalls;
	u32 overruns;
	u32 inflight;
};

struct gap {
	u64 heartbeat; /* the heartbeat right after the gap */
	u64 tsc;       /* the gap in guest TSC ticks (stops while the VM is stopped under TCG) */
	u32 rtc_s;     /* the gap in wall-clock seconds (CMOS RTC, host time) */
	u32 pad;
};

struct mailbox {
	u32 magic;
	u32 version;
	u64 heartbeat;
	u64 dirty_passes;
	u64 dirty_pages;
	u32 tsc_khz;
	u32 nports;
	u32 status;
	u32 dirty_mib;
	u32 rate_mib;
	u32 depth;
	u32 rtc_now; /* seconds of the day */
	u32 ngaps;   /* gaps recorded so far; the last MAX_GAPS are in gaps[ngaps % MAX_GAPS] */
	u32 err_code;
	u32 err_port;
	u64 err_seq;
	u32 err_expected;
	u32 err_found;
	u64 max_gap_tsc;
	u32 max_gap_rtc;
	u32 pad;
	u8 reserved[24];
	struct gap gaps[MAX_GAPS];
	struct port_stats ports[MAX_PORTS];
};

_Static_assert(sizeof(struct port_stats) == 48, "port_stats layout");
_Static_assert(sizeof(struct gap) == 24, "gap layout");
_Static_assert(__builtin_offsetof(struct mailbox, gaps) == 128, "mailbox layout");
_Static_assert(sizeof(struct mailbox) == 128 + 8 * 24 + 8 * 48, "mailbox size");

__attribute__((section(".mailbox"), used)) volatile struct mailbox mb;

struct port_run {
	u32 base;
	u32 tx_seq;
	u32 rx_seq;
};
static struct port_run runs[MAX_PORTS];

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u32 inl(u16 port)
{
	u32 v;
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

static void say(const char *s)
{
	for (; *s; s++) {
		for (int i = 0; i < 100000 && !(inb(0x3fd) & 0x20); i++)
			;
		outb(0x3f8, (u8)*s);
	}
}

static void say_num(u32 n)
{
	char buf[12];
	int i = 11;
	buf[i] = 0;
	do {
		buf[--i] = (char)('0' + n % 10);
		n /= 10;
	} while (n && i > 0);
	say(buf + i);
}

static u32 arg(const char *cmdline, const char *key, u32 fallback)
{
	if (!cmdline)
		return fallback;
	for (const char *p = cmdline; *p; p++) {
		if (p != cmdline && p[-1] != ' ')
			continue;
		const char *k = key, *q = p;
		while (*k && *q == *k) {
			k++;
			q++;
		}
		if (*k || *q != '=')
			continue;
		u32 v = 0;
		for (q++; *q >= '0' && *q <= '9'; q++)
			v = v * 10 + (u32)(*q - '0');
		return v;
	}
	return fallback;
}

/* TSC ticks per millisecond, from 10 ms of PIT channel 2 (0 if the PIT never fires). */
static u32 tsc_khz(void)
{
	outb(0x61, (u8)((inb(0x61) & ~0x02) | 0x01));
	outb(0x43, 0xb0);
	outb(0x42, 11932 & 0xff); /* 1193182 Hz / 100 */
	outb(0x42, 11932 >> 8);
	u64 t0 = rdtsc();
	for (u32 i = 0; !(inb(0x61) & 0x20); i++)
		if (i > 50000000u)
			return 0;
	return (u32)(rdtsc() - t0) / 10;
}

/* The loop's pace: PIT channel 0 at TICK_HZ on IRQ 0; between passes the CPU waits in hlt, so a running
 * guest leaves its host's CPU to the migration (a busy loop took a whole core of a TCG host). */
#define TICK_HZ 100
volatile u32 bb_ticks; /* counted by irq_master (entry.S) */
void irq_master(void);
void irq_slave(void);

struct idt_gate {
	u16 off_lo;
	u16 sel;
	u8 zero;
	u8 type;
	u16 off_hi;
} __attribute__((packed));
static struct idt_gate idt[0x30]; /* exceptions stay absent: one still resets the guest, as before */

/* Is the tick running? Vectors 0x20-0x2f, the 8259 pair remapped there with only IRQ 0 open, the local
 * APIC passing the 8259's interrupts through (virtual wire), PIT channel 0 periodic; then up to
 * 100 ms for the first tick. No tick: the loop runs without waiting, as a busy loop. */
static int start_tick(u32 khz)
{
	for (u32 v = 0x20; v < 0x30; v++) {
		u32 a = (u32)(v < 0x28 ? irq_master : irq_slave);
		idt[v] = (struct idt_gate){(u16)a, 0x08, 0, 0x8e, (u16)(a >> 16)};
	}
	struct {
		u16 limit;
		u32 base;
	} __attribute__((packed)) idtr = {sizeof(idt) - 1, (u32)idt};
	__asm__ volatile("lidt %0" : : "m"(idtr));
	outb(0x20, 0x11); /* ICW1: edge, cascade, ICW4 follows */
	outb(0xa0, 0x11);
	outb(0x21, 0x20); /* ICW2: vectors */
	outb(0xa1, 0x28);
	outb(0x21, 0x04); /* ICW3: the slave on IRQ 2 */
	outb(0xa1, 0x02);
	outb(0x21, 0x01); /* ICW4: 8086 mode */
	outb(0xa1, 0x01);
	outb(0x21, 0xfe);
	outb(0xa1, 0xff);
	volatile u32 *lapic = (volatile u32 *)0xfee00000u;
	lapic[0xf0 / 4] |= 0x100;   /* spurious vector register: APIC on */
	lapic[0x350 / 4] = 0x700;   /* LVT LINT0: ExtINT, unmasked */
	u32 divisor = 1193182 / TICK_HZ;
	outb(0x43, 0x34); /* channel 0, lobyte/hibyte, rate generator */
	outb(0x40, (u8)divisor);
	outb(0x40, (u8)(divisor >> 8));
	u64 t0 = rdtsc(), limit = (u64)(khz ? khz : 1000000u) * 100;
	__asm__ volatile("sti");
	while (!bb_ticks && rdtsc() - t0 < limit)
		__asm__ volatile("pause");
	__asm__ volatile("cli");
	return bb_ticks != 0;
}

static u8 cmos(u8 reg)
{
	outb(0x70, reg);
	return inb(0x71);
}

static u32 bcd(u8 v, int is_bcd) { return is_bcd ? (u32)((v >> 4) * 10 + (v & 15)) : v; }

/* Seconds of the day by the RTC, or ~0 while an update is in progress (read twice: no torn value). */
static u32 rtc_seconds(void)
{
	if (cmos(0x0a) & 0x80)
		return ~0u;
	u8 s = cmos(0), m = cmos(2), h = cmos(4);
	if (cmos(0) != s || cmos(2) != m || cmos(4) != h)
		return ~0u;
	int is_bcd = !(cmos(0x0b) & 0x04);
	return bcd(h & 0x7f, is_bcd) * 3600 + bcd(m, is_bcd) * 60 + bcd(s, is_bcd);
}

static u32 pci_read(u32 bdf, u32 off)
{
	outl(0xcf8, 0x80000000u | (bdf << 8) | (off & 0xfc));
	return inl(0xcfc);
}

static void pci_write(u32 bdf, u32 off, u32 v)
{
	outl(0xcf8, 0x80000000u | (bdf << 8) | (off & 0xfc));
	outl(0xcfc, v);
}

static void error(u32 code, u32 port, u64 seq, u32 expected, u32 found)
{
	if (mb.err_code)
		return; /* the first error is the one that matters */
	mb.err_seq = seq;
	mb.err_port = port;
	mb.err_expected = expected;
	mb.err_found = found;
	mb.err_code = code;
}

static void add_port(u32 base, u32 bdf)
{
	u32 i = mb.nports;
	if (i >= MAX_PORTS)
		return;
	runs[i].base = base;
	mb.ports[i].io_base = base;
	mb.ports[i].bdf = bdf;
	outb((u16)(base + 2), 0x07); /* FCR: FIFO on (16 deep), both sides cleared */
	mb.nports = i + 1;
}

/* Every mtty function on every bus: its I/O BARs, one UART port each. The firmware (SeaBIOS runs
 * before the multiboot loader) assigns them; one it left unassigned on bus 0 gets an address here. */
static void find_ports(void)
{
	u32 next_io = 0xe000;
	for (u32 bus = 0; bus < 256; bus++) {
		for (u32 dev = 0; dev < 32; dev++) {
			for (u32 fn = 0; fn < 8; fn++) {
				u32 bdf = (bus << 8) | (dev << 3) | fn;
				u32 id = pci_read(bdf, 0);
				if ((id & 0xffff) == 0xffff) {
					if (fn == 0)
						break;
					continue;
				}
				if (id == MTTY_ID) {
					for (u32 bar = 0; bar < 2; bar++) {
						u32 off = 0x10 + 4 * bar, v = pci_read(bdf, off);
						if (!(v & 1))
							continue; /* mtty-1 has no BAR1 */
						if (!(v & ~3u) && bus == 0) {
							pci_write(bdf, off, next_io);
							pci_write(bdf, 4, pci_read(bdf, 4) | 1);
							v = pci_read(bdf, off);
							next_io += 0x10;
						}
						if (v & ~3u)
							add_port(v & 0xfffcu, bdf);
						else
							error(ERR_BAR, mb.nports, 0, bdf, bar);
					}
				}
				if (fn == 0 && !(pci_read(bdf, 0x0c) & 0x00800000u))
					break; /* not multi-function */
			}
		}
	}
}

static u8 seq_byte(u32 port, u32 seq) { return (u8)(seq * 7 + (seq >> 8) + port * 0x35 + 1); }

/* One step on one port: take back the oldest byte in flight, then top the FIFO up to `depth`. */
static void exercise(u32 i, u32 depth)
{
	struct port_run *r = &runs[i];
	volatile struct port_stats *st = &mb.ports[i];
	u16 base = (u16)r->base;
	u8 lsr = inb((u16)(base + 5));
	if (lsr & 0x02)
		st->overruns++;
	if (st->inflight) {
		if (lsr & 0x01) {
			u8 want = seq_byte(i, r->rx_seq), got = inb(base);
			r->rx_seq++;
			st->inflight--;
			st->received++;
			if (got != want) {
				st->mismatched++;
				error(ERR_MISMATCH, i, st->received, want, got);
				outb((u16)(base + 2), 0x07); /* start over from an empty FIFO */
				r->rx_seq = r->tx_seq;
				st->inflight = 0;
			}
		} else {
			st->stalls++;
			error(ERR_STALL, i, st->received, st->inflight, lsr);
			outb((u16)(base + 2), 0x07);
			r->rx_seq = r->tx_seq;
			st->inflight = 0;
		}
	}
	while (st->inflight < depth) {
		outb(base, seq_byte(i, r->tx_seq));
		r->tx_seq++;
		st->inflight++;
		st->sent++;
	}
}

void bb_main(u32 magic, const u32 *info)
{
	u8 *p = (u8 *)&mb;
	for (u32 i = 0; i < sizeof(mb); i++)
		p[i] = 0;
	mb.version = MAILBOX_VERSION;
	mb.status = STATUS_BOOTING;
	mb.magic = MAILBOX_MAGIC;

	const char *cmdline = (magic == 0x2badb002u && (info[0] & 4)) ? (const char *)info[4] : 0;
	u32 mem_end = (magic == 0x2badb002u && (info[0] & 1)) ? 0x100000u + info[2] * 1024u : 0x800000u;
	u32 dirty_mib = arg(cmdline, "dirty_mib", 16), rate_mib = arg(cmdline, "rate_mib", 16);
	u32 depth = arg(cmdline, "depth", 8);
	if (depth < 1 || depth > 15)
		depth = 8; /* 16 in mtty's 16-slot ring reads as empty (head == tail) */
	u32 span = mem_end > DIRTY_BASE ? (mem_end - DIRTY_BASE) >> 20 : 0;
	if (dirty_mib > span)
		dirty_mib = span;
	mb.dirty_mib = dirty_mib;
	mb.rate_mib = rate_mib;
	mb.depth = depth;
	u32 khz = tsc_khz();
	mb.tsc_khz = khz;
	find_ports();
	int ticking = start_tick(khz);

	say("bootblock: ");
	say_num(mb.nports);
	say(" ports, dirty ");
	say_num(dirty_mib);
	say(" MiB at ");
	say_num(rate_mib);
	say(" MiB/s, tsc ");
	say_num(khz);
	say(" kHz, ");
	say(ticking ? "a pass per tick" : "no tick: busy loop");
	say("\n");

	/* dirtying runs in 100 ms ticks: rate_mib * 25.6 pages (one word written per page) each */
	u64 tick = (u64)(khz ? khz : 1000000u) * 100;
	u32 per_tick = rate_mib * 256 / 10, pages = dirty_mib * 256, page = 0;
	u64 gap_tsc = (u64)(khz ? khz : 1000000u) * 100; /* record gaps over 100 ms (ten ticks) */
	u64 last = rdtsc(), next_tick = last;
	u32 last_rtc = rtc_seconds();
	mb.status = STATUS_RUNNING;
	for (;;) {
		u64 now = rdtsc(), d = now - last;
		u32 rtc = rtc_seconds(), rtc_gap = 0;
		last = now;
		mb.heartbeat++;
		if (rtc != ~0u) {
			if (last_rtc != ~0u)
				rtc_gap = (rtc + 86400 - last_rtc) % 86400;
			if (rtc_gap > 43200)
				rtc_gap = 0; /* the clock went back (a destination host whose clock is behind) */
			last_rtc = rtc;
			mb.rtc_now = rtc;
		}
		if (d > mb.max_gap_tsc)
			mb.max_gap_tsc = d;
		if (rtc_gap > mb.max_gap_rtc)
			mb.max_gap_rtc = rtc_gap;
		if (d > gap_tsc || rtc_gap > 1) {
			volatile struct gap *g = &mb.gaps[mb.ngaps % MAX_GAPS];
			g->heartbeat = mb.heartbeat;
			g->tsc = d;
			g->rtc_s = rtc_gap;
			mb.ngaps++;
		}
		if (pages && (u64)(now - next_tick) < ((u64)1 << 63)) {
			next_tick += tick;
			if ((u64)(now - next_tick) < ((u64)1 << 63))
				next_tick = now + tick; /* fell behind (a stop): no catch-up burst */
			for (u32 n = 0; n < per_tick || (rate_mib == 0 && n < pages); n++) {
				volatile u32 *w = (volatile u32 *)(DIRTY_BASE + (page << 12));
				*w = (u32)mb.dirty_passes ^ page;
				mb.dirty_pages++;
				if (++page == pages) {
					page = 0;
					mb.dirty_passes++;
				}
			}
		}
		for (u32 i = 0; i < mb.nports; i++)
			exercise(i, depth);
		if (ticking)
			__asm__ volatile("sti; hlt; cli" ::: "memory"); /* sti's one-instruction shadow: no tick lost before hlt */
	}
}
