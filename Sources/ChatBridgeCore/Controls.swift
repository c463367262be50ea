import Foundation
import Synchronization

/// The operator's levers, as one snapshot: who may use the bot, how much, which words are refused, the
/// personas, the routes that pick a model profile and a persona, and what users may switch. A reload
/// replaces the whole snapshot (``ControlsBox``); a message is handled under the snapshot it started with.
public struct Controls: Sendable, Equatable {
    public var access = AccessRules()
    public var limits = Limits()
    public var safety = Safety()
    /// Personas by name, in the order they are listed.
    public var personas: [Persona] = []
    public var routes: [Route] = []
    /// The model profiles configured (`default` always among them).
    public var profiles: [String] = ["default"]
    /// The profiles `/model NAME` may switch to; empty: `/model` is off.
    public var selectableModels: [String] = []
    /// `/system TEXT` sets a conversation's own system prompt.
    public var allowCustomPrompt = true
    /// `/donate KEY` in a direct chat adds a verified key to the default profile.
    public var acceptDonatedKeys = false
    /// The system prompt of conversations without a persona or their own (`llm.system_prompt`); nil: the
    /// engine's.
    public var systemPrompt: String?
    /// Days (limits, usage) are counted in this time zone.
    public var timeZone = TimeZone(identifier: "Asia/Shanghai")! {
        didSet { calendar = DayCalendar(timeZone: timeZone) }
    }
    /// The calendar of `timeZone`, made once.
    public private(set) var calendar = DayCalendar(timeZone: TimeZone(identifier: "Asia/Shanghai")!)

    public init() {}

    public func persona(named name: String) -> Persona? {
        personas.first { $0.name.lowercased() == name.lowercased() }
    }

    /// The first route that matches the message, if any.
    public func route(for message: InboundMessage) -> Route? {
        routes.first { $0.matches(message) }
    }

    /// The calendar day of `date` in the configured time zone, `YYYY-MM-DD`.
    public func day(of date: Date) -> String { calendar.day(of: date) }
}

/// Reads and writes calendar days in one time zone.
public struct DayCalendar: Sendable, Equatable {
    public let timeZone: TimeZone
    private let calendar: Calendar

    public init(timeZone: TimeZone) {
        self.timeZone = timeZone
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = timeZone
        self.calendar = calendar
    }

    public func day(of date: Date) -> String {
        let c = calendar.dateComponents([.year, .month, .day], from: date)
        func two(_ n: Int) -> String { n < 10 ? "0\(n)" : "\(n)" }
        return "\(c.year ?? 0)-\(two(c.month ?? 0))-\(two(c.day ?? 0))"
    }

    /// The first day of `date`'s month, `YYYY-MM-01`.
    public func firstDayOfMonth(of date: Date) -> String {
        let c = calendar.dateComponents([.year, .month], from: date)
        return String(format: "%04d-%02d-01", c.year ?? 0, c.month ?? 0)
    }

    /// The next midnight after `date` in this time zone.
    public func nextMidnight(after date: Date) -> Date {
        let start = calendar.startOfDay(for: date)
        return calendar.date(byAdding: .day, value: 1, to: start) ?? date.addingTimeInterval(86_400)
    }

    /// `HH:mm:ss` of `date` in this time zone.
    public func timeOfDay(_ date: Date) -> String {
        let c = calendar.dateComponents([.hour, .minute, .second], from: date)
        func two(_ n: Int?) -> String { let n = n ?? 0; return n < 10 ? "0\(n)" : "\(n)" }
        return "\(two(c.hour)):\(two(c.minute)):\(two(c.second))"
    }

    /// `2026-11-22 00:00 (Asia/Shanghai)`.
    public func describe(_ date: Date) -> String {
        let c = calendar.dateComponents([.year, .month, .day, .hour, .minute], from: date)
        return String(format: "%04d-%02d-%02d %02d:%02d", c.year ?? 0, c.month ?? 0, c.day ?? 0, c.hour ?? 0, c.minute ?? 0)
            + " (\(timeZone.identifier))"
    }

    /// Parses `YYYY-MM-DD`; nil for anything else.
    public static func isDay(_ text: String) -> Bool {
        let parts = text.split(separator: "-")
        guard parts.count == 3, parts[0].count == 4, parts[1].count == 2, parts[2].count == 2,
              let month = Int(parts[1]), let day = Int(parts[2]), Int(parts[0]) != nil,
              (1...12).contains(month), (1...31).contains(day) else { return false }
        return true
    }
}

/// Holds the current ``Controls``; a reload swaps them at once for every message that starts after it.
public final class ControlsBox: Sendable {
    private let value: Mutex<Controls>
    public init(_ controls: Controls) { value = Mutex(controls) }
    public var current: Controls { value.withLock { $0 } }
    public func replace(with controls: Controls) { value.withLock { $0 = controls } }
}

/// Who may use the bot. Ids are written `platform:id` (`dingtalk:0420001`, `lark:ou_…`); a user matches by
/// the platform's sender id or, on DingTalk, the staff id.
public struct AccessRules: Sendable, Equatable {
    public var admins: Set<String> = []
    public var allowUsers: Set<String> = []
    public var denyUsers: Set<String> = []
    public var allowChats: Set<String> = []
    public var denyChats: Set<String> = []
    public var directChats = true
    public var groupChats = true

    public init() {}

    public enum Decision: Sendable, Equatable {
        case allowed
        /// A direct message the rules refuse: the user is told, at most once an hour.
        case refusedDirect(String)
        /// A group message the rules refuse: ignored silently (logged once per group).
        case ignoredGroup(String)
    }

    /// The ids a sender is known by, `platform:id`: the organisation's user id first when the platform gives
    /// one (DingTalk's staff id, which admins know), then the platform's sender id. The first one is what
    /// limits and usage count under.
    public static func userIDs(of message: InboundMessage) -> [String] {
        var ids: [String] = []
        if let staff = message.sender.staffID, !staff.isEmpty { ids.append("\(message.platform):\(staff)") }
        if message.sender.staffID != message.sender.id { ids.append("\(message.platform):\(message.sender.id)") }
        return ids
    }

    public static func chatID(of message: InboundMessage) -> String { "\(message.platform):\(message.chat.id)" }

    public func isAdmin(_ message: InboundMessage) -> Bool {
        Self.userIDs(of: message).contains { admins.contains($0) }
    }

    /// Deny wins. Then a direct chat needs `direct_chats` and, when `allow_users` is set, a listed user (or an
    /// admin). A group needs `group_chats` and, when `allow_users` or `allow_chats` is set, a listed group or
    /// a listed user (or an admin).
    public func decide(_ message: InboundMessage) -> Decision {
        let users = Self.userIDs(of: message)
        let chat = Self.chatID(of: message)
        let group = message.chat.kind == .group
        func refused(_ why: String) -> Decision { group ? .ignoredGroup(why) : .refusedDirect(why) }
        if users.contains(where: { denyUsers.contains($0) }) { return refused("user in access.deny_users") }
        if denyChats.contains(chat) { return refused("chat in access.deny_chats") }
        let admin = users.contains { admins.contains($0) }
        let listedUser = users.contains { allowUsers.contains($0) }
        if group {
            guard groupChats else { return refused("access.group_chats is false") }
            if allowUsers.isEmpty && allowChats.isEmpty { return .allowed }
            return allowChats.contains(chat) || listedUser || admin ? .allowed : refused("chat not in access.allow_chats, user not in access.allow_users")
        }
        guard directChats || admin else { return refused("access.direct_chats is false") }
        if allowUsers.isEmpty || listedUser || admin { return .allowed }
        return refused("user not in access.allow_users")
    }
}

/// How much each user and chat may ask. Nil is unlimited. Counted in the database, shared by replicas.
public struct Limits: Sendable, Equatable {
    public var userPerMinute: Int? = 10
    public var userDailyMessages: Int?
    public var userDailyTokens: Int?
    public var chatDailyTokens: Int?
    public init() {}
    public var isUnlimited: Bool { userPerMinute == nil && userDailyMessages == nil && userDailyTokens == nil && chatDailyTokens == nil }
}

/// Words a question may not contain and an answer shows masked.
public struct Safety: Sendable, Equatable {
    public var blockedWords = BlockedWords([])
    /// The reply to a question with a blocked word; nil: the language's default.
    public var reply: String?
    public init() {}
}

/// A named system prompt.
public struct Persona: Sendable, Equatable {
    public var name: String
    public var prompt: String
    public var description: String
    public init(name: String, prompt: String, description: String = "") {
        self.name = name
        self.prompt = prompt
        self.description = description
    }
}

/// One rule of `routes`: messages that match every given field get this profile and/or persona.
public struct Route: Sendable, Equatable {
    public var platform: String?
    /// Chat ids, `platform:id` or the bare id.
    public var chats: Set<String> = []
    /// User ids, `platform:id` or the bare id.
    public var users: Set<String> = []
    public var profile: String?
    public var persona: String?

    public init(platform: String? = nil, chats: Set<String> = [], users: Set<String> = [], profile: String? = nil, persona: String? = nil) {
        self.platform = platform
        self.chats = chats
        self.users = users
        self.profile = profile
        self.persona = persona
    }

    public func matches(_ message: InboundMessage) -> Bool {
        if let platform, platform.lowercased() != message.platform { return false }
        if !chats.isEmpty, !chats.contains(message.chat.id), !chats.contains(AccessRules.chatID(of: message)) { return false }
        if !users.isEmpty {
            let ids = AccessRules.userIDs(of: message) + [message.sender.id] + [message.sender.staffID].compactMap { $0 }
            if !ids.contains(where: { users.contains($0) }) { return false }
        }
        return true
    }
}

/// A conversation's own choices: its persona, its model profile, its own system prompt. Kept across
/// `/reset`; cleared by `/reset all`.
public struct ConversationPreferences: Sendable, Equatable, Codable {
    public var persona: String?
    public var model: String?
    public var systemPrompt: String?
    public init(persona: String? = nil, model: String? = nil, systemPrompt: String? = nil) {
        self.persona = persona
        self.model = model
        self.systemPrompt = systemPrompt
    }
    public var isEmpty: Bool { persona == nil && model == nil && systemPrompt == nil }
}

/// Finds any of thousands of words in one pass over the text (Aho–Corasick over lower-cased Unicode
/// scalars), so its cost depends on the text, not on how many words are listed. Case-insensitive.
public struct BlockedWords: Sendable, Equatable {
    /// Two matchers are equal when they block the same words.
    public static func == (a: BlockedWords, b: BlockedWords) -> Bool { a.words == b.words }

    private struct Node: Sendable {
        var next: [Unicode.Scalar: Int32] = [:]
        var fail: Int32 = 0
        /// The longest word (in scalars) ending here, following failure links; 0 for none.
        var matchLength: Int32 = 0
    }
    private let nodes: [Node]
    public let count: Int
    /// The longest word, in lower-cased scalars.
    public let longestWord: Int
    /// The words, lower-cased and sorted (to tell two lists apart).
    public let words: [String]

    public init(_ words: [String]) {
        var nodes = [Node()]
        var count = 0
        var longest = 0
        for word in Set(words.map { $0.trimmingCharacters(in: .whitespacesAndNewlines) }) where !word.isEmpty {
            let scalars = Self.folded(word)
            guard !scalars.isEmpty else { continue }
            count += 1
            longest = max(longest, scalars.count)
            var state = 0
            for scalar in scalars {
                if let next = nodes[state].next[scalar] {
                    state = Int(next)
                } else {
                    nodes.append(Node())
                    nodes[state].next[scalar] = Int32(nodes.count - 1)
                    state = nodes.count - 1
                }
            }
            nodes[state].matchLength = max(nodes[state].matchLength, Int32(scalars.count))
        }
        // Breadth-first: failure links and inherited matches.
        var queue: [Int] = nodes[0].next.values.map { Int($0) }
        var head = 0
        while head < queue.count {
            let state = queue[head]
            head += 1
            for (scalar, child) in nodes[state].next {
                let childIndex = Int(child)
                var fail = Int(nodes[state].fail)
                while fail != 0 && nodes[fail].next[scalar] == nil { fail = Int(nodes[fail].fail) }
                let target = nodes[fail].next[scalar].map(Int.init) ?? 0
                nodes[childIndex].fail = Int32(target == childIndex ? 0 : target)
                nodes[childIndex].matchLength = max(nodes[childIndex].matchLength, nodes[Int(nodes[childIndex].fail)].matchLength)
                queue.append(childIndex)
            }
        }
        self.nodes = nodes
        self.count = count
        self.longestWord = longest
        self.words = Set(words.map { String(String.UnicodeScalarView(Self.folded($0.trimmingCharacters(in: .whitespacesAndNewlines)))) })
            .filter { !$0.isEmpty }.sorted()
    }

    public var isEmpty: Bool { count == 0 }

    /// Lower-cased scalars of `text`.
    static func folded(_ text: String) -> [Unicode.Scalar] {
        var result: [Unicode.Scalar] = []
        result.reserveCapacity(text.unicodeScalars.count)
        for scalar in text.unicodeScalars { fold(scalar) { result.append($0) } }
        return result
    }

    @inline(__always)
    private static func fold(_ scalar: Unicode.Scalar, _ emit: (Unicode.Scalar) -> Void) {
        if scalar.isASCII {
            let v = scalar.value
            emit((65...90).contains(v) ? Unicode.Scalar(v + 32)! : scalar)
        } else if scalar.properties.changesWhenLowercased {
            for lower in scalar.properties.lowercaseMapping.unicodeScalars { emit(lower) }
        } else {
            emit(scalar)
        }
    }

    private func step(_ state: Int, _ scalar: Unicode.Scalar) -> Int {
        var state = state
        while true {
            if let next = nodes[state].next[scalar] { return Int(next) }
            if state == 0 { return 0 }
            state = Int(nodes[state].fail)
        }
    }

    /// Whether `text` contains a blocked word.
    public func containsMatch(in text: String) -> Bool {
        guard count > 0 else { return false }
        var state = 0
        var found = false
        for scalar in text.unicodeScalars {
            Self.fold(scalar) { folded in
                state = step(state, folded)
                if nodes[state].matchLength > 0 { found = true }
            }
            if found { return true }
        }
        return false
    }

    /// `text` with every blocked word replaced by `*` (one per character).
    public func masked(_ text: String) -> String {
        guard count > 0 else { return text }
        let original = Array(text.unicodeScalars)
        // For each folded scalar, the original scalar it came from.
        var origin: [Int] = []
        var hide = [Bool](repeating: false, count: original.count)
        var state = 0
        var any = false
        for (index, scalar) in original.enumerated() {
            Self.fold(scalar) { folded in
                origin.append(index)
                state = step(state, folded)
                let length = Int(nodes[state].matchLength)
                if length > 0 {
                    any = true
                    let end = origin.count - 1
                    for position in (end - length + 1)...end { hide[origin[position]] = true }
                }
            }
        }
        guard any else { return text }
        var result = String.UnicodeScalarView()
        var index = 0
        while index < original.count {
            if hide[index] {
                result.append("*")
                // Combining marks of a hidden character are hidden with it.
                index += 1
                while index < original.count, hide[index], original[index].properties.generalCategory == .nonspacingMark { index += 1 }
            } else {
                result.append(original[index])
                index += 1
            }
        }
        return String(result)
    }
}
