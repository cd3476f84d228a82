// Disks with partition tables and file systems made by the real tools
// (sgdisk, sfdisk, mkfs.vfat, mkfs.ext4, mkswap, mkfs.ntfs, mkfs.exfat,
// mkfs.xfs, mkfs.btrfs, cryptsetup, genisoimage), converted to qcow2 by
// qemu-img, and what those tools (sfdisk --json, blkid -p) say about them:
// for wasm/tests/judge.mjs and web-demo/tests/e2e.mjs, which compare
// QcowImage.contents() and the page's partitions panel with them.
//
// A missing tool fails with the package to install (scripts/test-all.sh
// installs them all).
import { spawnSync } from 'node:child_process';
import { accessSync, chmodSync, closeSync, constants, ftruncateSync, openSync, rmSync } from 'node:fs';
import { delimiter, join } from 'node:path';

/** The Debian package of each tool. */
const PACKAGES = {
  sfdisk: 'fdisk', sgdisk: 'gdisk', blkid: 'util-linux', mkswap: 'util-linux', 'mkfs.ext4': 'e2fsprogs',
  'mkfs.ext2': 'e2fsprogs', 'mkfs.vfat': 'dosfstools', 'mkfs.exfat': 'exfatprogs', 'mkfs.ntfs': 'ntfs-3g',
  'mkfs.xfs': 'xfsprogs', 'mkfs.btrfs': 'btrfs-progs', genisoimage: 'genisoimage',
  cryptsetup: 'cryptsetup-bin', 'qemu-img': 'qemu-utils', dd: 'coreutils',
};

const found = new Map();

/**
 * The path of `tool`: on the PATH, else in /usr/sbin or /sbin (root's
 * tools, when the PATH lacks them). Throws, naming the package to install,
 * when it is nowhere.
 */
export function requireTool(tool) {
  if (found.has(tool)) return found.get(tool);
  const dirs = [...(process.env.PATH || '').split(delimiter).filter(Boolean), '/usr/sbin', '/sbin'];
  for (const d of dirs) {
    const p = join(d, tool);
    try {
      accessSync(p, constants.X_OK);
      found.set(tool, p);
      return p;
    } catch {
      // not here
    }
  }
  throw new Error(`${tool} is missing: install it with \`apt-get install ${PACKAGES[tool] || tool}\` ` +
    '(scripts/test-all.sh does)');
}

/** Runs `tool ARGS` in `dir` (it must succeed); its standard output. */
export function run(dir, tool, args, input) {
  const r = spawnSync(requireTool(tool), args, { cwd: dir, encoding: 'utf8', input });
  if (r.error) throw r.error;
  if (r.status !== 0) throw new Error(`${tool} ${args.join(' ')} failed (${r.status}): ${r.stdout}${r.stderr}`);
  return r.stdout;
}

/** A sparse file of `size` bytes (replacing any file of that name). */
export function sparseFile(dir, name, size) {
  const fd = openSync(join(dir, name), 'w');
  ftruncateSync(fd, size);
  closeSync(fd);
}

/** Writes the file `src` into `disk` at byte `offset`, keeping holes. */
export function place(dir, disk, offset, src) {
  if (offset % 512) throw new Error(`${offset} is not a multiple of 512`);
  run(dir, 'dd', [`if=${src}`, `of=${disk}`, 'bs=512', `seek=${offset / 512}`, 'conv=notrunc,sparse', 'status=none']);
}

/** `sfdisk --json FILE`'s partition table. */
export function sfdiskJson(dir, file) {
  return JSON.parse(run(dir, 'sfdisk', ['--json', file])).partitiontable;
}

/**
 * `blkid -p -o export` of `len` bytes at `offset` of `file` (low-level
 * probing, no cache), as an object; empty when blkid finds nothing.
 */
export function blkid(dir, file, offset, len) {
  const r = spawnSync(requireTool('blkid'), ['-p', '-o', 'export', '-O', String(offset), '-S', String(len), file],
    { cwd: dir, encoding: 'utf8' });
  if (r.error) throw r.error;
  // Exit status 2: nothing found.
  if (r.status !== 0 && r.status !== 2) throw new Error(`blkid ${file}: ${r.stdout}${r.stderr}`);
  const out = {};
  for (const line of r.stdout.split('\n')) {
    const i = line.indexOf('=');
    if (i > 0) out[line.slice(0, i)] = line.slice(i + 1).replace(/\\(.)/g, '$1');
  }
  return out;
}

/** Converts the raw disk `raw` into the qcow2 image `out` (qemu-img, `cluster_size`). */
export function toQcow2(dir, raw, out, clusterSize = 65536) {
  run(dir, 'qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${clusterSize}`, raw, out]);
}

/**
 * Makes the file system `fs` (`{ kind, label, ... }`) of `size` bytes at
 * byte `offset` of the raw disk `disk`: ext4 in place (`mkfs.ext4 -E
 * offset=`), the others in a file of their own written in with dd (then
 * removed).
 */
export function makeFs(dir, disk, offset, size, fs) {
  const file = `fs-${offset}.img`;
  if (fs.kind === 'ext4') {
    run(dir, 'mkfs.ext4', ['-q', '-F', '-L', fs.label, '-E', `offset=${offset}`, disk, `${size / 1024}k`]);
    return;
  }
  sparseFile(dir, file, size);
  switch (fs.kind) {
    case 'vfat':
      run(dir, 'mkfs.vfat', ['-F', String(fs.bits), '-n', fs.label, '-i', fs.serial, file]);
      break;
    case 'ext2':
      run(dir, 'mkfs.ext2', ['-q', '-F', '-L', fs.label, file]);
      break;
    case 'swap':
      chmodSync(join(dir, file), 0o600);
      run(dir, 'mkswap', ['-L', fs.label, '-U', fs.uuid, file]);
      break;
    case 'ntfs':
      run(dir, 'mkfs.ntfs', ['-q', '-F', '-Q', '-L', fs.label, file]);
      break;
    case 'exfat':
      run(dir, 'mkfs.exfat', ['-L', fs.label, file]);
      break;
    case 'xfs':
      run(dir, 'mkfs.xfs', ['-q', '-f', '-L', fs.label, file]);
      break;
    case 'btrfs':
      run(dir, 'mkfs.btrfs', ['-q', '-f', '-L', fs.label, file]);
      break;
    case 'luks2':
      run(dir, 'cryptsetup', ['luksFormat', '-q', '--type', 'luks2', '--pbkdf', 'pbkdf2', '--pbkdf-force-iterations',
        '1000', '--label', fs.label, '--key-file', '-', file], 'not a secret');
      break;
    default:
      throw new Error(`unknown file system ${fs.kind}`);
  }
  place(dir, disk, offset, file);
  rmSync(join(dir, file));
}

const MIB = 2 ** 20;

/**
 * A GPT disk made by sgdisk (`disk.raw` of `parts` + 2 MiB): `parts` are
 * `{ size (MiB), code (sgdisk type), name, attrs: [bits], fs }`; each `fs`
 * is made at its partition's offset as sfdisk reports it. Returns sfdisk's
 * JSON of the table.
 */
export function makeGptDisk(dir, raw, parts) {
  const total = parts.reduce((n, p) => n + p.size, 0) + 2;
  sparseFile(dir, raw, total * MIB);
  const args = [];
  parts.forEach((p, i) => {
    const n = i + 1;
    args.push(`-n${n}:0:+${p.size}M`, `-t${n}:${p.code}`);
    if (p.name) args.push(`-c${n}:${p.name}`);
  });
  parts.forEach((p, i) => {
    for (const bit of p.attrs || []) args.push(`-A${i + 1}:set:${bit}`);
  });
  run(dir, 'sgdisk', [...args, raw]);
  const table = sfdiskJson(dir, raw);
  if (table.partitions.length !== parts.length) throw new Error(`sgdisk made ${JSON.stringify(table)}`);
  parts.forEach((p, i) => {
    const t = table.partitions[i];
    if (p.fs) makeFs(dir, raw, t.start * 512, t.size * 512, p.fs);
  });
  return table;
}

/**
 * An MBR disk made by sfdisk (`raw`, 128 MiB, id 0x1234abcd): a bootable
 * FAT16 partition 1, ext4 in 2, an extended partition 3 holding logical
 * partitions 5 (swap), 6 (ext2) and 7 (NTFS). Returns sfdisk's JSON.
 */
export function makeMbrDisk(dir, raw) {
  sparseFile(dir, raw, 128 * MIB);
  const script = 'label: dos\nlabel-id: 0x1234abcd\n' +
    `${raw}1 : start=2048, size=16MiB, type=e, bootable\n` +
    `${raw}2 : size=24MiB, type=83\n` +
    `${raw}3 : size=48MiB, type=5\n` +
    `${raw}5 : size=8MiB, type=82\n` +
    `${raw}6 : size=12MiB, type=83\n` +
    `${raw}7 : size=16MiB, type=7\n`;
  run(dir, 'sfdisk', ['-q', raw], script);
  const table = sfdiskJson(dir, raw);
  const fs = {
    1: { kind: 'vfat', bits: 16, label: 'BOOT', serial: '0BADF00D' },
    2: { kind: 'ext4', label: 'data' },
    5: { kind: 'swap', label: 'swap5', uuid: '5f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0' },
    6: { kind: 'ext2', label: 'logical6' },
    7: { kind: 'ntfs', label: 'Seven' },
  };
  for (const t of table.partitions) {
    const n = Number(t.node.slice(raw.length));
    if (fs[n]) makeFs(dir, raw, t.start * 512, t.size * 512, fs[n]);
  }
  return table;
}

/** The GPT disk of the page test: FAT32 (ESP), ext4 with a label, swap, NTFS. */
export const PAGE_GPT = [
  { size: 40, code: 'ef00', name: 'EFI system', attrs: [0], fs: { kind: 'vfat', bits: 32, label: 'ESP', serial: '1234ABCD' } },
  { size: 24, code: '8300', name: 'root', attrs: [2], fs: { kind: 'ext4', label: 'rootfs' } },
  { size: 8, code: '8200', name: 'swap', fs: { kind: 'swap', label: 'swp', uuid: '0c6f1ab2-3d4e-4f50-8a61-7b8c9d0e1f2a' } },
  { size: 16, code: '0700', name: 'windows', attrs: [62, 63], fs: { kind: 'ntfs', label: 'Windows' } },
];

/**
 * The flags the wasm reports for sfdisk's `attrs` of a GPT partition of
 * type `typeId` (bit names as the core's `Flag`), in bit order.
 */
export function flagsOfAttrs(attrs, typeId) {
  const msData = typeId === 'EBD0A0A2-B9E5-4433-87C0-68B6B72699C7';
  const bits = [];
  for (const a of (attrs || '').split(/\s+/).filter(Boolean)) {
    if (a === 'RequiredPartition') bits.push(0);
    else if (a === 'NoBlockIOProtocol') bits.push(1);
    else if (a === 'LegacyBIOSBootable') bits.push(2);
    else if (a.startsWith('GUID:')) bits.push(...a.slice(5).split(',').map(Number));
    else throw new Error(`unknown attribute ${a}`);
  }
  const names = { 0: 'required', 1: 'no block IO protocol', 2: 'legacy BIOS bootable' };
  const ms = { 60: 'read-only', 61: 'shadow copy', 62: 'hidden', 63: 'no automount' };
  return bits.sort((a, b) => a - b).map((b) => names[b] || (msData && ms[b]) || `attribute bit ${b}`);
}

/**
 * The GPT partition types in words as util-linux names them (`sfdisk
 * --label gpt -T`), uppercase GUID -> name; Linux LUKS (8309), which
 * util-linux 2.38 does not name, as gdisk and the core name it.
 */
export function gptTypeNames(dir) {
  const out = {};
  for (const line of run(dir, 'sfdisk', ['--label', 'gpt', '-T']).split('\n')) {
    const m = /^([0-9A-Fa-f-]{36})\s+(.*)$/.exec(line.trim());
    if (m) out[m[1].toUpperCase()] = m[2].trim();
  }
  out['CA7D7CCB-63ED-4C53-861C-1742536059CC'] ??= 'Linux LUKS';
  return out;
}

/** What blkid's TYPE (and VERSION, for FAT) of a volume is in the wasm's words (`FilesystemInfo.type`). */
export function fsWords(b) {
  const words = { ext2: 'ext2', ext3: 'ext3', ext4: 'ext4', xfs: 'XFS', btrfs: 'Btrfs', exfat: 'exFAT', ntfs: 'NTFS',
    iso9660: 'ISO 9660', swap: 'Linux swap', LVM2_member: 'LVM2 PV', crypto_LUKS: 'LUKS' };
  return b.TYPE === 'vfat' ? b.VERSION : words[b.TYPE];
}

/** sfdisk's MBR type (`"83"`) as the wasm's `type-id` (`"0x83"`). */
export const mbrTypeId = (t) => `0x${t.padStart(2, '0')}`;
