// Per-chat history kept in localStorage: the visible records the page rendered and their last seq.
//
// The log is append-only and seq is gapless per chat, so a stored prefix never goes stale: after a
// reload the page shows it at once and resumes the stream `after` its last seq — nothing twice,
// nothing missing. The seq and the records are written as one value, so they always agree.

const PREFIX = "mozaiks.chat.";
const INDEX_KEY = "mozaiks.chats.recent";
const MAX_CHATS = 20;
// Past this size a chat is not cached: opening it replays from seq 0 instead (still exactly once).
const MAX_CHARS = 1_500_000;

function readIndex() {
  try {
    const ids = JSON.parse(localStorage.getItem(INDEX_KEY) || "[]");
    return Array.isArray(ids) ? ids.filter((id) => typeof id === "string") : [];
  } catch {
    return [];
  }
}

function writeIndex(ids) {
  try {
    localStorage.setItem(INDEX_KEY, JSON.stringify(ids));
  } catch {
    // Quota reached even for the index: caching is simply off.
  }
}

/** The stored history of a chat: {seq, records} (seq 0 and no records when none is stored). */
export function loadHistory(chatId) {
  try {
    const stored = JSON.parse(localStorage.getItem(PREFIX + chatId) || "null");
    if (stored && stored.v === 1 && Number.isInteger(stored.seq) && Array.isArray(stored.records)) {
      return { seq: stored.seq, records: stored.records };
    }
  } catch {
    // Unreadable entry: fall through to a full replay.
  }
  return { seq: 0, records: [] };
}

/** Store a chat's rendered records and last seq; evicts the least recently used chats on quota. */
export function saveHistory(chatId, seq, records) {
  const value = JSON.stringify({ v: 1, seq, records });
  const ids = [chatId, ...readIndex().filter((id) => id !== chatId)];
  if (value.length > MAX_CHARS) {
    forgetHistory(chatId);
    return;
  }
  for (;;) {
    try {
      localStorage.setItem(PREFIX + chatId, value);
      break;
    } catch {
      const victim = ids.length > 1 ? ids.pop() : null;
      if (!victim) {
        forgetHistory(chatId);
        return;
      }
      localStorage.removeItem(PREFIX + victim);
    }
  }
  while (ids.length > MAX_CHATS) localStorage.removeItem(PREFIX + ids.pop());
  writeIndex(ids);
}

/** Drop one chat's stored history (it no longer exists, or caching it failed). */
export function forgetHistory(chatId) {
  try {
    localStorage.removeItem(PREFIX + chatId);
  } catch {
    // Nothing stored.
  }
  writeIndex(readIndex().filter((id) => id !== chatId));
}

/** Drop every stored history (the token changed: another user must not see this one's chats). */
export function forgetAllHistory() {
  for (const id of readIndex()) localStorage.removeItem(PREFIX + id);
  try {
    for (let i = localStorage.length - 1; i >= 0; i--) {
      const key = localStorage.key(i);
      if (key && key.startsWith(PREFIX)) localStorage.removeItem(key);
    }
  } catch {
    // Storage unavailable.
  }
  writeIndex([]);
}
